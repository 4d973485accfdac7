"""Images reach the model as the picture a person sees, within limits stated once (scout_data.images)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_twist.serve.inference import load_image
from llava_twist.serve.model_worker import decode_image
from llava_twist.serve.result import InferenceError
from llava_twist.serve.worker_protocol import RequestError
from scout_data.images import ImageError, image_size_problem, read_image, to_rgb

WHITE = 255


def grey16(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 16-bit greyscale PNG (a ramp over the full 16-bit range) and the 8-bit picture it shows."""
    values = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    return path, np.rint(values / 257.0).astype(np.uint8)


def test_a_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path, want = grey16(tmp_path)
    got = np.asarray(read_image(path))
    assert got.shape == (32, 64, 3)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 1], want)
    assert (got == WHITE).mean() < 0.01  # Pillow's own convert("RGB") makes it all white


def test_transparency_is_composited_over_white() -> None:
    grey = np.full((8, 8), 40, dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, 8).astype(np.uint8), (8, 1))
    la = Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA")
    a = alpha.astype(float) / 255.0
    want = np.rint(40 * a + WHITE * (1 - a))
    got = np.asarray(to_rgb(la))[..., 0].astype(float)
    assert np.abs(got - want).max() <= 1

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    got = np.asarray(to_rgb(palette))
    assert tuple(got[0, 0]) == (200, 0, 0) and tuple(got[0, 7]) == (WHITE, WHITE, WHITE)


def test_cmyk_and_exif_orientation_match_a_reference_conversion() -> None:
    cmyk = Image.new("CMYK", (12, 8), (0, 255, 255, 0))
    assert np.array_equal(np.asarray(to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))
    rotated = Image.new("RGB", (12, 8), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif)
    assert read_image(buffer.getvalue()).size == (8, 12)


@pytest.mark.parametrize(("size", "named"), [
    ((20000, 8), "long side may be at most"),
    ((100, 4000), "32 times the short one"),
    ((7, 100), "at least 8"),
    ((8000, 8000), "megapixels"),
])  # fmt: skip
def test_limits_name_the_problem(size: tuple[int, int], named: str) -> None:
    assert named in (image_size_problem(*size) or "")


def test_every_reader_refuses_a_long_strip_and_reads_16_bit(tmp_path: Path) -> None:
    strip = tmp_path / "strip.png"
    Image.new("L", (20000, 8)).save(strip)  # 573 bytes, 0.16 MP: 6 GB once padded to a square
    with pytest.raises(ImageError, match="strip.png: it is 20000x8 pixels"):
        read_image(strip)
    with pytest.raises(InferenceError, match="strip.png: it is 20000x8"):
        load_image(str(strip))
    with pytest.raises(RequestError, match="image 0: it is 20000x8"):
        decode_image(base64.b64encode(strip.read_bytes()).decode(), 0)
    path, want = grey16(tmp_path)
    assert np.array_equal(np.asarray(load_image(str(path)))[..., 2], want)
    assert np.array_equal(np.asarray(decode_image(base64.b64encode(path.read_bytes()).decode(), 0))[..., 2], want)

"""Images as a model may see them: one owner for the limits on an image and for turning any file into the RGB
picture a person sees (EXIF orientation applied, 16-bit and float greys scaled, transparency over white, palette and
CMYK converted), used by the CLI, the evaluation runner, the model worker, the playground, ``validate`` and
``preview``. A file is read through :func:`scout_data.inputs.read_input` (a regular file, at most
:data:`~scout_data.inputs.MAX_IMAGE_BYTES`)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from scout_data.inputs import MAX_IMAGE_BYTES, InputError, read_input, size_problem

MIN_IMAGE_SIDE = 8  # smaller images make CLIP's preprocessing guess the channel axis wrong
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_SIDE = 8192  # LLaVA pads to a square of the long side: its cost grows with the long side squared
MAX_ASPECT_RATIO = 32
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """An image that cannot be asked about, with why."""


def image_size_problem(width: int, height: int) -> str | None:
    """Why an image of this size cannot be asked about (LLaVA's preprocessing, memory), or None."""
    if min(width, height) < MIN_IMAGE_SIDE:
        return f"it is {width}x{height} pixels; both sides must be at least {MIN_IMAGE_SIDE}"
    if width * height > MAX_IMAGE_PIXELS:
        megapixels, limit = width * height / 1e6, MAX_IMAGE_PIXELS / 1e6
        return f"it is {width}x{height} = {megapixels:.0f} megapixels; the limit is {limit:.0f}"
    if max(width, height) > MAX_IMAGE_SIDE:
        return f"it is {width}x{height} pixels; the long side may be at most {MAX_IMAGE_SIDE}"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return f"it is {width}x{height} pixels; the long side may be at most {MAX_ASPECT_RATIO} times the short one"
    return None


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grey image scaled to 8 bits by its type's range (not clipped at 255)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
    elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
        top = 65535.0
    else:
        top = 255.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, orient: bool = True) -> Image.Image:
    """The RGB picture a person sees in ``image`` (a new image; ``image`` is left as it is); ``orient``: EXIF
    orientation applied (LLaVA's training and eval scripts ignore it)."""
    if orient:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _grey_to_8bit(image)
    if image.mode == "P":
        rgba = "transparency" in image.info or (image.palette is not None and image.palette.mode == "RGBA")
        image = image.convert("RGBA" if rgba else "RGB")
    if image.mode == "La":
        image = image.convert("RGBa").convert("RGBA")
    if image.mode in ("LA", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, BACKGROUND)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")


def read_image(source: str | os.PathLike | bytes, name: str | None = None, orient: bool = True) -> Image.Image:
    """The RGB picture in a file (or in ``bytes``), checked against the limits (:func:`to_rgb`);
    :class:`ImageError` names ``name`` (default: the path) and the problem."""
    name = name or (str(source) if not isinstance(source, bytes) else "the image")
    if isinstance(source, bytes):
        if problem := size_problem(len(source), MAX_IMAGE_BYTES, "it"):
            raise ImageError(f"{name}: {problem}")
    else:
        try:
            source = read_input(source, MAX_IMAGE_BYTES, name=name)
        except FileNotFoundError:
            raise ImageError(f"{name}: not found") from None
        except InputError as exc:
            raise ImageError(str(exc)) from None
    return open_image(source, name, orient)


def open_image(data: bytes, name: str, orient: bool = True) -> Image.Image:
    """:func:`read_image` of bytes already read (and within the byte limit)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            problem = image_size_problem(*im.size)
            if problem:
                raise ImageError(f"{name}: {problem}")
            im.load()
            return to_rgb(im, orient)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError, TypeError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name}: cannot be read as an image ({type(exc).__name__})") from exc

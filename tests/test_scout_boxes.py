"""Box frames: exact round trips for any image size and box, and LLaVA's own padding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from scout_data.boxes import (
    box_problem_px,
    box_xyxy_norm_to_px,
    box_xyxy_px_to_norm,
    clamp_xyxy_px,
    coco_xywh_to_xyxy,
    format_box,
    frame_size,
    pad_offset,
    xyxy_to_xywh,
)
from scout_data.parse import BOX_RE, parse_boxes, parse_chain

sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@st.composite
def image_and_box(draw: st.DrawFn) -> tuple[int, int, tuple[int, int, int, int]]:
    w, h = draw(sizes)
    x1 = draw(st.integers(0, w - 1))
    y1 = draw(st.integers(0, h - 1))
    x2 = draw(st.integers(x1 + 1, w))
    y2 = draw(st.integers(y1 + 1, h))
    return w, h, (x1, y1, x2, y2)


@settings(max_examples=300, deadline=None)
@given(image_and_box(), st.sampled_from(["padded", "original"]))
def test_px_norm_px_round_trip_is_exact_to_the_pixel(case, frame):
    w, h, box = case
    norm = box_xyxy_px_to_norm(box, w, h, frame)
    assert all(0.0 <= v <= 1.0 for v in norm)
    back = box_xyxy_norm_to_px(norm, w, h, frame)
    assert tuple(round(v) for v in back) == box
    assert max(abs(a - b) for a, b in zip(back, box, strict=True)) < 1e-6


@settings(max_examples=300, deadline=None)
@given(image_and_box())
def test_padded_and_original_frames_convert_into_each_other(case):
    w, h, box = case
    orig = box_xyxy_px_to_norm(box, w, h, "original")
    padded = box_xyxy_px_to_norm(box_xyxy_norm_to_px(orig, w, h, "original"), w, h, "padded")
    assert tuple(round(v) for v in box_xyxy_norm_to_px(padded, w, h, "padded")) == box


@settings(max_examples=300, deadline=None)
@given(image_and_box(), st.sampled_from(["padded", "original"]))
def test_two_decimal_text_lands_within_half_a_step_of_the_frame(case, frame):
    w, h, box = case
    text = format_box(box_xyxy_px_to_norm(box, w, h, frame))
    assert BOX_RE.fullmatch(text)
    (parsed,) = parse_chain(text).answer_boxes_xyxy_norm
    back = box_xyxy_norm_to_px(parsed, w, h, frame)
    fw, fh = frame_size(w, h, frame)
    for v, ref, side in zip(back, box, (fw, fh, fw, fh), strict=True):
        assert abs(v - ref) <= 0.005 * side + 1e-6


@pytest.mark.parametrize("size", [(7, 3), (3, 7), (10, 10), (641, 480), (480, 641), (5, 6)])
def test_pad_offset_matches_llava_expand2square(size):
    from llava.mm_utils import expand2square

    w, h = size
    im = Image.new("RGB", (w, h), (0, 0, 0))
    im.putpixel((0, 0), (255, 0, 0))
    sq = expand2square(im, (255, 255, 255))
    red = [(x, y) for x in range(sq.width) for y in range(sq.height) if sq.getpixel((x, y)) == (255, 0, 0)]
    assert red == [pad_offset(w, h)]
    assert sq.size == frame_size(w, h, "padded")


def test_coco_and_clamp_and_problems():
    assert coco_xywh_to_xyxy([10, 20, 30, 40]) == (10.0, 20.0, 40.0, 60.0)
    assert xyxy_to_xywh((10, 20, 40, 60)) == (10.0, 20.0, 30.0, 40.0)
    assert clamp_xyxy_px((-5, 2, 120, 50), 100, 40) == (0.0, 2.0, 100.0, 40.0)
    assert box_problem_px((1, 1, 5, 5), 10, 10) is None
    assert "degenerate" in box_problem_px((5, 1, 5, 5), 10, 10)
    assert "outside" in box_problem_px((1, 1, 11, 5), 10, 10)
    assert format_box((0.1, 0.15, 0.3, 0.35)) == "[0.10, 0.15, 0.30, 0.35]"
    assert format_box((-0.2, 0.5, 1.7, 1.0)) == "[0.00, 0.50, 1.00, 1.00]"
    assert parse_boxes("a [0.1,0.2, 0.3 ,0.4] b") == [(0.1, 0.2, 0.3, 0.4)]
    with pytest.raises(ValueError):
        box_xyxy_px_to_norm((0, 0, 1, 1), 0, 10)
    with pytest.raises(ValueError):
        frame_size(10, 10, "square")

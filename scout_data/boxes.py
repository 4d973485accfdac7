"""Box formats and frames: the one place where boxes change representation.

Internally every box is pixel ``xyxy`` in the *original* image (``box_xyxy_px``). Text seen by
the model is normalised ``xyxy`` in a *frame*:

- ``padded`` (default): the square LLaVA-1.5 actually sees with ``image_aspect_ratio=pad``
  (``expand2square``: the image centred on a ``max(w, h)`` square, offset ``(max - min) // 2``
  on the short side);
- ``original``: normalised by the image's own width and height.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterator, Sequence
from typing import Any

Box = tuple[float, float, float, float]
FRAMES = ("padded", "original")
DEFAULT_FRAME = "padded"

def model_frame(image_aspect_ratio: str | None) -> str:
    """The frame a LLaVA model's boxes are in: the padded square it sees with ``image_aspect_ratio=pad``
    (LLaVA-1.5's setting, and the default when unset), else the original image."""
    return "padded" if (image_aspect_ratio or "pad") == "pad" else "original"


def _check_frame(frame: str) -> None:
    if frame not in FRAMES:
        raise ValueError(f"unknown box frame {frame!r}; expected one of {FRAMES}")


def _check_size(width: float, height: float) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")


def pad_offset(width: int, height: int) -> tuple[int, int]:
    """Pixel offset ``(dx, dy)`` of the original image inside LLaVA's padded square."""
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2


def frame_size(width: int, height: int, frame: str = DEFAULT_FRAME) -> tuple[int, int]:
    """Width and height of the frame that normalised coordinates refer to."""
    _check_frame(frame)
    if frame == "padded":
        side = max(width, height)
        return side, side
    return width, height


def coco_xywh_to_xyxy(box_xywh: Sequence[float]) -> Box:
    x, y, w, h = (float(v) for v in box_xywh)
    return (x, y, x + w, y + h)


def xyxy_to_xywh(box_xyxy: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return (x1, y1, x2 - x1, y2 - y1)


def clamp_xyxy_px(box_xyxy_px: Sequence[float], width: float, height: float) -> Box:
    x1, y1, x2, y2 = (float(v) for v in box_xyxy_px)
    return (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )


def clamp_xyxy_norm(box_xyxy_norm: Sequence[float]) -> Box:
    return tuple(min(max(float(v), 0.0), 1.0) for v in box_xyxy_norm)  # type: ignore[return-value]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes in the same units; 0 when they do not overlap. (Scoring
    many boxes at once uses ``torchvision.ops.box_iou``: ``llava_twist.eval.common.iou_matrix``.)"""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def is_degenerate(box_xyxy: Sequence[float], min_size: float = 0.0) -> bool:
    """True when the box has no area (or a side not larger than ``min_size``)."""
    x1, y1, x2, y2 = box_xyxy
    return not (x2 - x1 > min_size and y2 - y1 > min_size)


def box_problem_px(box_xyxy_px: Sequence[float], width: float, height: float) -> str | None:
    """Why a pixel box is unusable in a ``width`` x ``height`` image, or None when it is fine."""
    if len(box_xyxy_px) != 4:
        return f"box needs 4 numbers, got {len(box_xyxy_px)}"
    x1, y1, x2, y2 = box_xyxy_px
    if x2 <= x1 or y2 <= y1:
        return f"degenerate box {list(box_xyxy_px)} (x2 <= x1 or y2 <= y1)"
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        return f"box {list(box_xyxy_px)} lies outside the {width}x{height} image"
    return None


def box_xyxy_px_to_norm(
    box_xyxy_px: Sequence[float], width: int, height: int, frame: str = DEFAULT_FRAME
) -> Box:
    """Original-image pixel xyxy -> normalised xyxy in ``frame`` (full precision, not rounded)."""
    _check_size(width, height)
    fw, fh = frame_size(width, height, frame)
    dx, dy = pad_offset(width, height) if frame == "padded" else (0, 0)
    x1, y1, x2, y2 = (float(v) for v in box_xyxy_px)
    return ((x1 + dx) / fw, (y1 + dy) / fh, (x2 + dx) / fw, (y2 + dy) / fh)


def box_xyxy_norm_to_px(
    box_xyxy_norm: Sequence[float], width: int, height: int, frame: str = DEFAULT_FRAME
) -> Box:
    """Normalised xyxy in ``frame`` -> original-image pixel xyxy (not clamped)."""
    _check_size(width, height)
    fw, fh = frame_size(width, height, frame)
    dx, dy = pad_offset(width, height) if frame == "padded" else (0, 0)
    x1, y1, x2, y2 = (float(v) for v in box_xyxy_norm)
    return (x1 * fw - dx, y1 * fh - dy, x2 * fw - dx, y2 * fh - dy)


def format_box(box_xyxy_norm: Sequence[float], decimals: int = 2) -> str:
    """LLaVA-1.5 box text: ``[x1, y1, x2, y2]``, normalised, ``decimals`` places, clamped to [0, 1]."""
    return "[" + ", ".join(f"{v:.{decimals}f}" for v in clamp_xyxy_norm(box_xyxy_norm)) + "]"



BOX_FIELD_SUFFIXES = ("_xyxy_px", "_xyxy_norm")  # a record's box fields: one box, or a list of boxes ("boxes_...")


def box_fields(value: Any, where: str = "") -> Iterator[tuple[str, Any, bool]]:
    """``(field path, value, holds a list of boxes)`` for every box field in ``value`` (a record, a question),
    nested objects and lists of objects included."""
    if isinstance(value, dict):
        for key, v in value.items():
            name = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and key.endswith(BOX_FIELD_SUFFIXES):
                yield name, v, "boxes" in key
            else:
                yield from box_fields(v, name)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from box_fields(v, f"{where}[{i}]")


def _is_box(box: Any) -> bool:
    return isinstance(box, list) and len(box) == 4 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box)


def box_field_problem(value: Any) -> str | None:
    """The first box field of ``value`` that is not ``[x1, y1, x2, y2]`` of four finite numbers (or, for a
    ``boxes`` field, a list of them), or None."""
    for name, field, many in box_fields(value):
        if many and not isinstance(field, list):
            return f"field {name!r} must be a list of boxes [x1, y1, x2, y2], got {reprlib.repr(field)}"
        for i, box in enumerate(field if many else [field]):
            if not _is_box(box):
                shown = f"{name}[{i}]" if many else name
                return f"field {shown!r} must be [x1, y1, x2, y2] of four numbers, got {reprlib.repr(box)}"
    return None

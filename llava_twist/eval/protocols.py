"""Scoring protocols for referring expressions: which box of an answer is the prediction, in which frame.

Numbers from different protocols are not comparable, so every refexp result names the one it follows.

- ``ours``: the first box of the ``Answer:`` line (or of a one-shot answer) as ``scout_data.parse`` reads
  LLaVA's box text, in the question's ``box_frame`` (``padded`` unless said), clamped to the image.
- ``lmms-eval``: lmms-eval's ``refcoco_bbox_rec`` rule, re-implemented from its published code: the first
  ``[a, b, c, d]`` of plain decimals anywhere in the text, read as fractions of the *original* image, not
  clamped; text without one predicts ``[0, 0, 0, 0]`` (a miss). Its prompt is :data:`LMMS_EVAL_REC_PROMPT`.

Both score IoU >= 0.5 against the ground truth in pixels of the original image (IoU does not change when x
and y are scaled by the image's width and height, which is how lmms-eval normalises its ground truth).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llava_twist.serve.result import InferenceError, result_from_text
from scout_data.boxes import FRAMES, Box, box_xyxy_norm_to_px

ACC_THRESHOLD = 0.5
LMMS_EVAL_REC_PROMPT = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
    "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
    "bounding box coordinate of the region this sentence describes: {expression}"
)
_LMMS_NUM = r"(-?\d+(?:\.\d+)?)"
_LMMS_BOX_RE = re.compile(rf"\[\s*{_LMMS_NUM},\s*{_LMMS_NUM},\s*{_LMMS_NUM},\s*{_LMMS_NUM}\s*\]")
LMMS_NO_BOX = "no four-number box in the text (lmms-eval scores a zero box)"


@dataclass(frozen=True)
class Protocol:
    name: str
    frame: str | None  # None: the question's box_frame (or --box-frame)
    summary: str

    def describe(self, frame: str) -> dict[str, object]:
        return {"name": self.name, "frame": frame, "threshold": ACC_THRESHOLD, "rule": self.summary}


OURS = Protocol("ours", None, "first Answer: box (LLaVA box text), question's frame, clamped to the image")
LMMS_EVAL = Protocol(
    "lmms-eval", "original", "first [a, b, c, d] in the text, original frame (whatever --box-frame says), not clamped"
)
PROTOCOLS = {p.name: p for p in (OURS, LMMS_EVAL)}


def predicted_box(protocol: Protocol, text: str, image_size: tuple[int, int], frame: str) -> tuple[Box | None, str]:
    """The top-1 box in pixels of the original image under ``protocol``, read in ``frame``; else (None, why)."""
    if frame not in FRAMES:
        raise InferenceError(f"box frame {frame!r}: expected one of {FRAMES}")
    if protocol is LMMS_EVAL:
        m = _LMMS_BOX_RE.search(text)
        if m is None:
            return None, LMMS_NO_BOX
        return box_xyxy_norm_to_px([float(g) for g in m.groups()], *image_size, frame), ""
    parsed = result_from_text(text, image_size, frame)
    if parsed.miss_reason:
        return None, parsed.miss_reason
    return parsed.answer_boxes_xyxy_px[0], ""

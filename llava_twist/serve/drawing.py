"""Boxes drawn onto the image they are about: one colour per step (:mod:`scout_data.palette`), answers thicker."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from llava_twist.serve.result import InferenceResult
from scout_data.palette import ANSWER_COLOUR, step_colour

MAX_DRAWN_SIDE = 4096  # an enlarged copy stays this small on its longer side (a 1 x 20000 px upload is not enlarged)


def draw_boxes(image: Image.Image, result: InferenceResult, width: int = 3, min_width: int = 0) -> Image.Image:
    """A copy of ``image`` with every box drawn, one colour per step (answer boxes thicker), labelled. An image
    narrower than ``min_width`` is drawn on a copy enlarged by a whole factor (pixels kept sharp), so that small
    images show their boxes and labels readably; the boxes stay in the image's own pixels in ``result``."""
    scale = max(1, min(math.ceil(min_width / max(1, image.width)), MAX_DRAWN_SIDE // max(image.size)))
    out = image.convert("RGB")
    out = out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for box in result.boxes:
        colour = ANSWER_COLOUR if box.step is None else step_colour(box.step)
        x1, y1, x2, y2 = (v * scale for v in box.box_xyxy_px)
        thick = width + 1 if box.step is None else width
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=colour, width=thick)
        label = box.label
        tx, ty = x1 + 2, max(0.0, y1 - 12)
        left, top, right, bottom = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((tx, ty), label, fill=(0, 0, 0), font=font)
    return out

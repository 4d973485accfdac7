"""Draw a chain onto its image: each step's boxes in its own colour, labelled ``S1``, ``S2`` ..., the
answer boxes thick and labelled ``A``, the chain text in a panel below. Boxes come from parsing the text
(what the model sees or said) and are mapped back to the original image's pixels."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from scout_data.boxes import DEFAULT_FRAME, box_xyxy_norm_to_px
from scout_data.chain import answer_line, step_line
from scout_data.palette import ANSWER_COLOUR, step_colour
from scout_data.parse import parse_chain


def draw_chain(image: Image.Image, text: str, frame: str = DEFAULT_FRAME, title: str = "") -> Image.Image:
    """A new image: ``image`` with the boxes of chain ``text`` drawn on it and the text below."""
    w, h = image.size
    chain = parse_chain(text)
    font = ImageFont.load_default()
    canvas = image.convert("RGB")
    d = ImageDraw.Draw(canvas)
    groups = [
        (f"S{s.index}", step_colour(s.index), s.boxes_xyxy_norm, 2) for s in chain.steps
    ]
    groups.append(("A", ANSWER_COLOUR, chain.answer_boxes_xyxy_norm, 4))
    labels_at: dict[tuple[int, int], int] = {}
    for label, colour, boxes, width in groups:
        for box in boxes:
            x1, y1, x2, y2 = box_xyxy_norm_to_px(box, w, h, frame)
            d.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=width)
            corner = (round(x1), round(y1))
            shift = labels_at.get(corner, 0)
            labels_at[corner] = shift + 6 * len(label) + 4
            tx, ty = x1 + 2 + shift, max(0, y1 - 11)
            d.rectangle([tx - 1, ty, tx + 6 * len(label) + 1, ty + 10], fill=colour)
            d.text((tx, ty), label, fill=(255, 255, 255), font=font)
    chars = max(20, w // 6)
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if title:
        lines += [(t, (0, 0, 0)) for t in textwrap.wrap(title, chars)]
    for s in chain.steps:
        lines += [(t, step_colour(s.index)) for t in textwrap.wrap(step_line(s.index, s.text), chars)]
    answer = answer_line(chain.answer_text) if chain.has_answer_line or not chain.steps else "(no answer line)"
    lines += [(t, (0, 0, 0)) for t in textwrap.wrap(answer, chars)]  # the answer's gold is for boxes on images
    lines += [(t, (120, 120, 120)) for p in chain.problems for t in textwrap.wrap(f"! {p}", chars)]
    panel = 14 * len(lines) + 8
    out = Image.new("RGB", (w, h + panel), (255, 255, 255))
    out.paste(canvas, (0, 0))
    d = ImageDraw.Draw(out)
    for i, (line, colour) in enumerate(lines):
        d.text((4, h + 4 + 14 * i), line, fill=colour, font=font)
    return out


def draw_record(record: dict, image: Image.Image) -> Image.Image:
    """Preview of a LLaVA record: its first gpt turn drawn in the record's ``box_frame``."""
    convs = record["conversations"]
    human = convs[0]["value"].replace("<image>", "").strip()
    gpt = convs[1]["value"] if len(convs) > 1 else ""
    return draw_chain(image, gpt, record.get("box_frame", DEFAULT_FRAME), title=f"Q: {human}")

"""Render a :class:`~scout_data.schema.Sample` as one LLaVA conversation record.

The human turn is ``<image>\\n`` + :func:`render_prompt` (the same prompt evaluation builds); the gpt
turn is the chain ``Step 1: ...\\nStep 2: ...\\nAnswer: ...`` with every ``<box>`` slot replaced by
LLaVA-1.5 box text (normalised, two decimals, in the chosen frame). ``region`` samples answer with
box text only and ``qa`` samples with plain text.

Sources build step sentences with :func:`phrase` (several phrasings per step kind, picked by a seeded
``random.Random``) and :func:`item_list`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from scout_data.boxes import DEFAULT_FRAME, Box, box_xyxy_px_to_norm, format_box
from scout_data.chain import answer_line, step_line
from scout_data.schema import BOX_SLOT, UNDERSTANDING_KINDS, UNDERSTANDING_TASK, Sample

IMAGE_TOKEN = "<image>"
STEP_BY_STEP = "Answer step by step."
REGION_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {query}."
REGION_CAPTION_PROMPT = "Please provide a short description for this region: {query}."
ONE_SHOT_PROMPTS = {"region": REGION_PROMPT, "region_caption": REGION_CAPTION_PROMPT}  # LLaVA-1.5's REC and REG

PHRASES: dict[str, tuple[str, ...]] = {
    "asks": (
        "The question asks for {target}.",
        "I need to find {target}.",
        "The query refers to {target}.",
        "I am looking for {target}.",
    ),
    "asks_all": (
        "The question asks for every {target}.",
        "I need to find all the {targets}.",
        "The query wants each {target} in the image.",
    ),
    "asks_count": (
        "The question asks how many {targets} there are.",
        "I need to count the {targets}.",
        "To answer, I count every {target}.",
    ),
    "asks_caption": (
        "The task is to describe the image and locate each thing I mention.",
        "I need a short description of the image with a box for each object.",
        "I describe the image and give the box of every object I name.",
    ),
    "candidates": (
        "I see these candidates: {items}.",
        "The candidates are {items}.",
        "Looking at the image, I find {items}.",
    ),
    "candidates_one": (
        "I see only one candidate: {items}.",
        "There is a single candidate: {items}.",
        "Only one object fits: {items}.",
    ),
    "no_candidates": (
        "I see no {targets} in the image.",
        "There are no {targets} here.",
    ),
    "anchor": (
        "The {anchor} is at {box}.",
        "I locate the {anchor} at {box}.",
        "The reference object, the {anchor}, is at {box}.",
    ),
    "pick_attribute": (
        "Of them, the {attribute} one is {box}.",
        "The one that is {attribute} is {box}.",
        "Only one of them is {attribute}: {box}.",
    ),
    "pick_only": (
        "It is the only one, at {box}.",
        "So the answer is this one, at {box}.",
    ),
    "pick_relation": (
        "Of them, the one {relation} the {anchor} is {box}.",
        "The candidate {relation} the {anchor} is {box}.",
        "Only one candidate is {relation} the {anchor}: {box}.",
    ),
    "pick_superlative": (
        "Comparing them, the {superlative} one is {box}.",
        "Of these, the {superlative} is {box}.",
        "The {superlative} of them is {box}.",
    ),
    "matches": (
        "The ones that are {targets} are {boxes}.",
        "Of them, these are {targets}: {boxes}.",
        "The matching ones are {boxes}.",
    ),
    "count_total": (
        "That makes {count}.",
        "So there are {count} in total.",
        "Counting them gives {count}.",
    ),
    "caption_plan": (
        "I see {count} objects and describe them from left to right.",
        "There are {count} objects; I go from left to right.",
        "I list the {count} objects from left to right.",
    ),
}


def phrase(rng: random.Random, key: str, **fields: Any) -> str:
    """One phrasing of step kind ``key`` (see :data:`PHRASES`), filled with ``fields``."""
    return rng.choice(PHRASES[key]).format(**fields)


def item_list(names: Sequence[str], with_boxes: bool = True) -> str:
    """``"red circle <box>, blue star <box> and green square <box>"`` (one slot per name)."""
    items = [f"{n} {BOX_SLOT}" if with_boxes else n for n in names]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def slots(n: int) -> str:
    """``"<box>, <box>, <box>"``."""
    return ", ".join([BOX_SLOT] * n)


def render_prompt(query: str, kind: str) -> str:
    """The human prompt (without ``<image>``) for ``query``; evaluation builds prompts with this too."""
    q = " ".join(query.split())
    if kind == "qa":
        return q
    if kind in ONE_SHOT_PROMPTS:
        return ONE_SHOT_PROMPTS[kind].format(query=q.rstrip("."))
    return f"{q} {STEP_BY_STEP}"


def render_human(query: str, kind: str, with_image: bool = True) -> str:
    return (IMAGE_TOKEN + "\n" if with_image else "") + render_prompt(query, kind)


def fill_slots(text: str, boxes_xyxy_norm: Sequence[Box], decimals: int = 2) -> str:
    """Replace each ``<box>`` in ``text`` by the next box's text; the counts must agree."""
    parts = text.split(BOX_SLOT)
    if len(parts) - 1 != len(boxes_xyxy_norm):
        raise ValueError(f"{len(parts) - 1} box slots but {len(boxes_xyxy_norm)} boxes in {text!r}")
    out = [parts[0]]
    for box, rest in zip(boxes_xyxy_norm, parts[1:], strict=True):
        out.append(format_box(box, decimals))
        out.append(rest)
    return "".join(out)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?", ":")) else text + "."


def _answer_line(sample: Sample, boxes_norm: list[Box]) -> str:
    text = sample.answer_text.strip()
    if BOX_SLOT in text:
        return answer_line(fill_slots(text, boxes_norm))
    box_text = ", ".join(format_box(b) for b in boxes_norm)
    return answer_line(" ".join(t for t in (text, box_text) if t))


def render_gpt(sample: Sample, frame: str = DEFAULT_FRAME) -> str:
    """The gpt turn for ``sample``."""
    w, h = sample.width, sample.height
    answer_norm = [box_xyxy_px_to_norm(b, w, h, frame) for b in sample.answer_boxes_xyxy_px]
    if sample.kind in UNDERSTANDING_KINDS:
        return sample.answer_text.strip()
    if sample.kind == "region":
        return ", ".join(format_box(b) for b in answer_norm)
    lines = []
    for i, step in enumerate(sample.steps, 1):
        norm = [box_xyxy_px_to_norm(b, w, h, frame) for b in step.boxes_xyxy_px]
        lines.append(step_line(i, _sentence(fill_slots(step.text, norm))))
    lines.append(_answer_line(sample, answer_norm))
    return "\n".join(lines)


def rendered_query(sample: Sample, frame: str = DEFAULT_FRAME) -> str:
    """The sample's query with its ``<box>`` slots filled (a region caption's query is the region's box)."""
    if BOX_SLOT not in sample.query:
        return sample.query
    return fill_slots(sample.query, [box_xyxy_px_to_norm(b, sample.width, sample.height, frame)
                                     for b in sample.query_boxes_xyxy_px])


def _rounded(box: Sequence[float], places: int = 6) -> list[float]:
    return [round(float(v), places) for v in box]


def render_record(sample: Sample, frame: str = DEFAULT_FRAME) -> dict[str, Any]:
    """The LLaVA conversation record for ``sample`` (extra keys ride along; LLaVA ignores them).

    ``steps[i].text`` is the rendered step sentence; ``*_xyxy_norm`` boxes are in ``box_frame`` at full
    precision (6 places) and ``answer_boxes_xyxy_px`` are original-image pixels.
    """
    w, h = sample.width, sample.height
    with_image = bool(sample.image)
    record: dict[str, Any] = {"id": sample.id}
    if with_image:
        record["image"] = sample.image
    query = rendered_query(sample, frame)
    record["conversations"] = [
        {"from": "human", "value": render_human(query, sample.kind, with_image)},
        {"from": "gpt", "value": render_gpt(sample, frame)},
    ]
    steps = []
    for step in sample.steps:
        norm = [box_xyxy_px_to_norm(b, w, h, frame) for b in step.boxes_xyxy_px]
        steps.append(
            {"text": _sentence(fill_slots(step.text, norm)), "boxes_xyxy_norm": [_rounded(b) for b in norm]}
        )
    record.update(
        task=UNDERSTANDING_TASK if sample.kind in UNDERSTANDING_KINDS else sample.task,
        kind=sample.kind,
        difficulty=sample.difficulty,
        split=sample.split,
        box_frame=frame,
        image_size=[w, h],
        query=query,
        steps=steps,
        answer_boxes_xyxy_norm=[
            _rounded(box_xyxy_px_to_norm(b, w, h, frame)) for b in sample.answer_boxes_xyxy_px
        ],
        answer_boxes_xyxy_px=[_rounded(b, 3) for b in sample.answer_boxes_xyxy_px],
        answer_text=sample.answer_text,
        source=sample.source,
        source_ids=sample.source_ids,
    )
    expression = sample.expression or (sample.query if sample.kind == "region" else "")
    if expression:
        record["expression"] = " ".join(expression.split())
    return record

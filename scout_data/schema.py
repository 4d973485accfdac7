"""The typed SCOUT sample: a query about an image, a chain of steps with boxes, the answer.

Boxes are pixel xyxy in the original image (``box_xyxy_px``); frames and normalisation happen only
when a sample is rendered (``scout_data.boxes``). A step's ``text`` marks where each of its boxes goes
with the placeholder ``<box>`` (one per box, in order); the writer replaces them with box text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scout_data.boxes import Box

BOX_SLOT = "<box>"

Task = Literal["grounding", "understanding"]
GROUNDING_TASK, UNDERSTANDING_TASK = "grounding", "understanding"
TASKS = (GROUNDING_TASK, UNDERSTANDING_TASK)


def record_task(record: dict) -> str:
    """A training record's task: its ``task``, else understanding (LLaVA's own instruction data carries none).
    Grounding records take TWIST's grounding route, understanding ones the frozen route."""
    return record.get("task") or UNDERSTANDING_TASK
Kind = Literal[
    "refexp",  # referring expression: attributes, spatial relations, superlatives
    "find_all",  # every instance of a category: several answer boxes
    "count",  # count with boxes
    "grounded_caption",  # caption whose phrases carry boxes
    "region",  # one-shot box answer without steps (LLaVA-1.5's RefCOCO/VG region data)
    "region_caption",  # a short description of the region whose box the prompt gives (LLaVA-1.5's RefCOCO REG)
    "qa",  # understanding question (colour, shape, count, yes/no, left/right, caption)
]
UNDERSTANDING_KINDS = ("qa", "region_caption")  # answered in words, without a box: understanding samples
Difficulty = Literal["simple", "hard"]
Split = Literal["train", "val", "test", "testA", "testB"]


@dataclass
class Step:
    """One reasoning sentence; ``text`` holds one ``<box>`` slot per box, in order."""

    text: str
    boxes_xyxy_px: list[Box] = field(default_factory=list)


@dataclass
class Sample:
    id: str
    image: str  # path relative to the image folder
    width: int
    height: int
    query: str
    kind: Kind
    task: Task = "grounding"
    steps: list[Step] = field(default_factory=list)
    answer_boxes_xyxy_px: list[Box] = field(default_factory=list)
    answer_text: str = ""  # text of the answer line (may hold <box> slots for grounded captions)
    difficulty: Difficulty = "simple"
    split: str = "train"
    source: str = "synthetic"
    source_ids: dict[str, object] = field(default_factory=dict)
    expression: str = ""  # the referring expression alone (refexp; a region's query is one), for one-shot prompts
    query_boxes_xyxy_px: list[Box] = field(default_factory=list)  # what the query's ``<box>`` slots show, in order

    def all_boxes_xyxy_px(self) -> list[Box]:
        return [*self.query_boxes_xyxy_px, *(b for s in self.steps for b in s.boxes_xyxy_px),
                *self.answer_boxes_xyxy_px]


@dataclass
class Skip:
    """An input record a converter could not use: ``ref`` names it (file and id/index), ``reason`` says why."""

    ref: str
    reason: str

"""How a model's greedy chains miss on the demo's synthetic scenes, whose records list every object.

Each answer box is set against every object of its scene (right, on another object, on none), and each step's
box against the object its words name (``the large red circle [...]``): whether the chain fails at choosing among
objects it found, or earlier, at finding the objects it names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from llava_twist.eval.common import answers_by_id, parse_answer, question_frame
from scout_data.boxes import iou
from scout_data.sources.synthetic.world import COLOURS, SHAPES, SIZES

ATTRIBUTE_WORDS = frozenset((*SHAPES, *COLOURS, *SIZES))
HIT = 0.5


def _object_at(box: Sequence[float], objects: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The object ``box`` lands on (IoU >= 0.5, the best one), or None."""
    best = max(objects, key=lambda o: iou(box, o["box_xyxy_px"]), default=None)
    return best if best is not None and iou(box, best["box_xyxy_px"]) >= HIT else None


def _named(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) & ATTRIBUTE_WORDS


def chain_misses(questions: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]],
                 records: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts over the referring-expression ``questions`` whose record (by question id) lists its scene's
    objects (``source_ids.objects``, pixel boxes) and that have an answer: where each first answer box lands (no
    box: on no object), and for steps with one box, whether it lands on an object and on one that has every
    attribute the step's words name."""
    by_id = answers_by_id(answers)
    answer = {"right": 0, "another_object": 0, "no_object": 0}
    steps = {"boxes": 0, "on_an_object": 0, "on_the_named_object": 0}
    for q in questions:
        record = records.get(str(q["question_id"]))
        objects = (record or {}).get("source_ids", {}).get("objects")
        result = parse_answer(q, by_id.get(str(q["question_id"])), question_frame(q, None))
        if not objects or result is None:
            continue
        boxes = result.answer_boxes_xyxy_px
        target = q["bbox_xyxy_px"]
        if boxes and iou(boxes[0], target) >= HIT:
            answer["right"] += 1
        elif boxes and _object_at(boxes[0], objects) is not None:
            answer["another_object"] += 1
        else:
            answer["no_object"] += 1
        step_boxes = iter(b.box_xyxy_px for b in result.boxes if b.step is not None)  # in step order
        for step in result.chain.steps:
            px = [next(step_boxes) for _ in step.boxes_xyxy_norm]  # a step's own boxes, even if its number repeats
            if len(px) != 1:
                continue
            found = _object_at(px[0], objects)
            named = _named(step.text)
            steps["boxes"] += 1
            steps["on_an_object"] += found is not None
            steps["on_the_named_object"] += bool(
                found is not None and named and named <= {found["shape"], found["colour"], found["size"]})
    return {"n": sum(answer.values()), "answer": answer, "steps": steps}

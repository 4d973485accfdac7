"""Where a model's greedy chains go wrong on the demo's synthetic scenes, whose records list every object.

Each answer box is set against every object of its scene (right, on another object, on none). Each step is read in
SCOUT's step grammar (:mod:`scout_data.chain`) and judged by its role:

- *anchor*: a relation's reference object (``the reference object [...]``; in a worded chain, a step that names
  the anchor in its words, ``the red square [...]``), right when its one box is on the anchor;
- *candidates*: any other step that names objects (``the triangles [...], [...]``), right when its boxes are on
  exactly the objects its words name (a singular phrase with one box, as a terse chain's steps: the box on an
  object that has every attribute the words name);
- *decide*: a step that states the deciding fact (``the one it asks for: [...]``), right when its box is on the
  target.

Step accuracy is the share of steps right; *consistency* the share of chains whose answer's box is the box of the
step that decided (the last step). Together they say where a chain goes wrong: the anchor, the candidates, or the
choice.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from llava_twist.eval.common import answers_by_id, parse_answer, question_frame
from scout_data.boxes import iou
from scout_data.chain import REFERENCE, is_decide_step, step_phrase
from scout_data.sources.synthetic.world import COLOURS, REL_WORDS, SHAPES, SIZES, plural

HIT = 0.5
NOUNS = {**{s: s for s in SHAPES}, **{plural(s): s for s in SHAPES}, "object": None, "objects": None}
PLURALS = frozenset((*(plural(s) for s in SHAPES), "objects"))
ATTRIBUTES = frozenset((*COLOURS, *SIZES))
ROLES = ("anchor", "candidates", "decide")


def _object_at(box: Sequence[float], objects: Sequence[dict[str, Any]]) -> int | None:
    """The index of the object ``box`` lands on (IoU >= 0.5, the best one), or None."""
    scores = [iou(box, o["box_xyxy_px"]) for o in objects]
    best = max(range(len(objects)), key=scores.__getitem__, default=None)
    return best if best is not None and scores[best] >= HIT else None


def named(text: str) -> set[str] | None:
    """The attributes a phrase names (``the large red circles`` -> {large, red, circle}); None when it names none
    (no noun and no attribute of the world)."""
    words = re.findall(r"[a-z]+", text.lower())
    got = {w for w in words if w in ATTRIBUTES} | {NOUNS[w] for w in words if NOUNS.get(w)}
    return got if got or any(w in NOUNS for w in words) else None


def fits(obj: dict[str, Any], words: set[str]) -> bool:
    return words <= {obj["shape"], obj["colour"], obj["size"]}


def anchor_phrase(expression: str) -> str | None:
    """The anchor's words of a relation (``the triangle left of the red square`` -> ``the red square``)."""
    for words in sorted(REL_WORDS.values(), key=len, reverse=True):
        before, sep, after = expression.partition(f" {words} ")
        if sep:
            return after
    return None


def _judge(step_text: str, boxes: list[list[float]], objects: list[dict[str, Any]], target: int | None,
           anchor: int | None, anchor_words: set[str] | None) -> tuple[str, bool]:
    """The role of one model step and whether it is right."""
    on = [_object_at(b, objects) for b in boxes]
    if is_decide_step(step_text):
        return "decide", len(on) == 1 and on[0] is not None and on[0] == target
    words = named(step_phrase(step_text))
    if anchor is not None and (step_phrase(step_text).strip() == REFERENCE or words is not None
                               and words == anchor_words):
        return "anchor", on == [anchor]
    if words is None:
        return "candidates", False
    if len(boxes) == 1 and not PLURALS & set(re.findall(r"[a-z]+", step_text.lower())):
        # one object (terse chains name one a step): any object that has every attribute the words name
        return "candidates", on[0] is not None and fits(objects[on[0]], words)
    want = {j for j, o in enumerate(objects) if fits(o, words) and j != anchor}
    return "candidates", None not in on and len(set(on)) == len(on) and set(on) == want


def chain_misses(questions: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]],
                 records: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts over the referring-expression ``questions`` whose record (by question id) lists its scene's objects
    (``source_ids.objects``, pixel boxes) and that have an answer: where each first answer box lands, each step's
    role and whether it is right (:func:`_judge`), consistency, the anchor found, the target among the steps;
    overall and by expression type."""
    by_id = answers_by_id(answers)
    total: dict[str, Counter[str]] = {}
    for q in questions:
        record = records.get(str(q["question_id"]))
        objects = (record or {}).get("source_ids", {}).get("objects")
        result = parse_answer(q, by_id.get(str(q["question_id"])), question_frame(q, None))
        if not objects or result is None:
            continue
        c = Counter()
        target = _object_at(q["bbox_xyxy_px"], objects)
        phrase = anchor_phrase(str(q.get("expression", "")))
        anchor_words = named(phrase) if phrase else None
        anchors = [j for j, o in enumerate(objects) if anchor_words is not None and fits(o, anchor_words)]
        anchor = anchors[0] if len(anchors) == 1 else None
        boxes = result.answer_boxes_xyxy_px
        answer_on = _object_at(boxes[0], objects) if boxes else None
        c["n"] += 1
        c["answer_right"] += bool(boxes) and iou(boxes[0], q["bbox_xyxy_px"]) >= HIT
        c["answer_on_another_object"] += answer_on is not None and answer_on != target
        c["answer_on_no_object"] += answer_on is None
        step_boxes = iter(b.box_xyxy_px for b in result.boxes if b.step is not None)  # in step order
        steps = [(s.text, [next(step_boxes) for _ in s.boxes_xyxy_norm]) for s in result.chain.steps]
        steps = [(text, px) for text, px in steps if px]
        seen: set[int | None] = set()
        for text, px in steps:
            role, right = _judge(text, px, objects, target, anchor, anchor_words)
            c["anchor_found"] += anchor is not None and (role, right) == ("anchor", True) and not c["anchor_found"]
            c["steps"] += 1
            c["steps_right"] += right
            c[f"{role}_steps"] += 1
            c[f"{role}_right"] += right
            c["step_boxes"] += len(px)
            c["step_boxes_on_an_object"] += sum(_object_at(b, objects) is not None for b in px)
            seen |= {_object_at(b, objects) for b in px}
        if steps and boxes:
            c["chains"] += 1
            c["consistent"] += any(iou(boxes[0], b) >= HIT for b in steps[-1][1])
            c["answer_among_steps"] += answer_on is not None and answer_on in seen
        c["target_among_steps"] += bool(steps) and target in seen
        if anchor is not None:
            c["relations"] += 1
        for key in ("all", str(q.get("expression_type") or "other")):
            total.setdefault(key, Counter()).update(c)
    return {key: summarise(c) for key, c in total.items()}


def _share(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "rate": k / n if n else None}


def summarise(c: Counter[str]) -> dict[str, Any]:
    """The counts of :func:`chain_misses` as shares, each with its numerator and denominator."""
    return {
        "n": c["n"],
        "answer": {"right": _share(c["answer_right"], c["n"]),
                   "on_another_object": _share(c["answer_on_another_object"], c["n"]),
                   "on_no_object": _share(c["answer_on_no_object"], c["n"])},
        "step_accuracy": _share(c["steps_right"], c["steps"]),
        "by_role": {r: _share(c[f"{r}_right"], c[f"{r}_steps"]) for r in ROLES},
        "step_boxes_on_an_object": _share(c["step_boxes_on_an_object"], c["step_boxes"]),
        "consistency": _share(c["consistent"], c["chains"]),
        "answer_among_steps": _share(c["answer_among_steps"], c["chains"]),
        "target_among_steps": _share(c["target_among_steps"], c["n"]),
        "anchor_found": _share(c["anchor_found"], c["relations"]),
    }


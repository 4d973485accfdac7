"""Counts over a LLaVA JSON file: records per task/kind/difficulty/split/source, steps and boxes per
record, answer boxes, gpt length."""

from __future__ import annotations

from collections import Counter
from typing import Any

from scout_data.parse import parse_chain


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 3) if xs else 0.0


def dataset_stats(records: list[Any]) -> dict[str, Any]:
    counters: dict[str, Counter[str]] = {
        k: Counter() for k in ("task", "kind", "difficulty", "split", "source")
    }
    steps, boxes, answers, words = [], [], [], []
    with_image = 0
    for rec in records:
        if not isinstance(rec, dict):
            continue
        for key, c in counters.items():
            c[str(rec.get(key, "-"))] += 1
        with_image += "image" in rec
        gpt = [t.get("value", "") for t in rec.get("conversations", [])[1::2] if isinstance(t, dict)]
        if not gpt:
            continue
        words.append(sum(len(str(v).split()) for v in gpt))
        if rec.get("task") == "understanding":
            continue
        chain = parse_chain(str(gpt[0]))
        steps.append(len(chain.steps))
        boxes.append(len(chain.all_boxes_xyxy_norm()))
        answers.append(len(chain.answer_boxes_xyxy_norm))
    return {
        "records": len(records),
        "with_image": with_image,
        **{k: dict(c.most_common()) for k, c in counters.items()},
        "grounding_chains": {
            "mean_steps": _mean(steps),
            "mean_boxes": _mean(boxes),
            "answer_boxes": dict(sorted(Counter(answers).items())),
        },
        "mean_gpt_words": _mean(words),
    }

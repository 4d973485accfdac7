"""Referring-expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg, SCOUT refexp): Acc@0.5 and mean IoU.

The top-1 prediction is the first answer box. It is read in the frame the model answers in (the
question's ``box_frame``, or ``--box-frame``), mapped to pixels of the original image and clamped to it;
IoU with the ground truth ``bbox_xyxy_px`` is computed there. An answer without a box is a miss (IoU 0)
counted in the parse-failure rate with the parser's reason; a degenerate predicted box is a miss with IoU 0.

    python -m llava_twist.eval.eval_refexp --question-file refcoco_val.jsonl --answers-file answers.jsonl
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from llava_twist.eval.common import (
    NO_ANSWER,
    EvalError,
    Failures,
    answers_by_id,
    group_key,
    image_size,
    iou_matrix,
    parse_answer,
    question_frame,
    ratio,
    scorer_main,
)
from scout_data.boxes import is_degenerate

HEADLINE = ["acc@0.5", "mean_iou"]


def _gt_box(question: dict[str, Any]) -> tuple[float, float, float, float]:
    box = question.get("bbox_xyxy_px")
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise EvalError(f"question {question.get('question_id')}: needs 'bbox_xyxy_px' [x1, y1, x2, y2]")
    return tuple(float(v) for v in box)  # type: ignore[return-value]


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    return {
        "n": n,
        "acc@0.5": ratio(sum(r["correct"] for r in rows), n),
        "mean_iou": ratio(sum(r["iou"] for r in rows), n),
        "parse_failure_rate": ratio(sum(r["parse_failure"] for r in rows), n),
    }


def score_refexp(
    questions: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]], box_frame: str | None = None
) -> dict[str, Any]:
    """Metrics of ``answers`` on ``questions`` (see the module docstring); also the per-question rows."""
    by_id = answers_by_id(answers)
    failures = Failures()
    rows = []
    invalid_gt = 0
    for q in questions:
        qid = q.get("question_id")
        gt = _gt_box(q)
        w, h = image_size(q)
        if is_degenerate(gt):
            invalid_gt += 1
            failures.add(qid, f"degenerate ground-truth box {list(gt)} (question not scored)")
            continue
        parsed = parse_answer(q, by_id.get(str(qid)), question_frame(q, box_frame))
        row = {"question_id": qid, "group": group_key(q), "iou": 0.0, "correct": False, "parse_failure": False}
        if parsed is None:
            row["parse_failure"] = True
            failures.add(qid, NO_ANSWER)
        elif parsed.miss_reason:
            row["parse_failure"] = True
            failures.add(qid, parsed.miss_reason)
        else:
            pred = parsed.answer_boxes_xyxy_px[0]
            row["pred_xyxy_px"] = list(pred)
            if is_degenerate(pred):
                failures.add(qid, f"degenerate predicted box {[round(v, 1) for v in pred]} in {w}x{h} pixels")
            row["iou"] = float(iou_matrix([pred], [gt])[0, 0])
            row["correct"] = row["iou"] >= 0.5
        rows.append(row)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    metrics = _summary(rows)
    n = metrics.pop("n")
    metrics["invalid_ground_truth"] = invalid_gt
    return {
        "benchmark": "refexp",
        "n": n,
        "headline": HEADLINE,
        "metrics": metrics,
        "by_group": {g: _summary(rs) for g, rs in sorted(groups.items())} if len(groups) > 1 else {},
        "failures": failures.to_json(),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return scorer_main(score_refexp, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())

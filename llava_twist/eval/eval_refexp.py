"""Referring-expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg, SCOUT refexp): Acc@0.5 and mean IoU.

The top-1 prediction, its frame and the parse rule follow a named protocol (``--protocol``, see
:mod:`llava_twist.eval.protocols`): ``ours`` (default; the first ``Answer:`` box in the question's
``box_frame``, clamped to the image) or ``lmms-eval`` (their RefCOCO rule, comparable with their published
table). The result names its protocol and also gives Acc@0.5 with the answers read in each frame
(``acc@0.5[padded]``, ``acc@0.5[original]``), since the frame a LLaVA-1.5 model answers in is disputed. IoU is
computed in pixels of the original image; an answer without a box is a miss (IoU 0) counted in the
parse-failure rate with the reason; a degenerate predicted box is a miss with IoU 0.

    python -m llava_twist.eval.eval_refexp --question-file refcoco_val.jsonl --answers-file answers.jsonl \
        [--protocol lmms-eval]
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
    question_frame,
    ratio,
    scorer_main,
)
from llava_twist.eval.protocols import ACC_THRESHOLD, OURS, PROTOCOLS, predicted_box
from llava_twist.serve.result import InferenceError
from scout_data.boxes import FRAMES, Box, is_degenerate

HEADLINE = ["acc@0.5", "mean_iou"]


def _gt_box(question: dict[str, Any]) -> tuple[float, float, float, float]:
    box = question.get("bbox_xyxy_px")
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise EvalError(f"question {question.get('question_id')}: needs 'bbox_xyxy_px' [x1, y1, x2, y2]")
    return tuple(float(v) for v in box)  # type: ignore[return-value]


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    out = {
        "n": n,
        "acc@0.5": ratio(sum(r["correct"] for r in rows), n),
        "mean_iou": ratio(sum(r["iou"] for r in rows), n),
        "parse_failure_rate": ratio(sum(r["parse_failure"] for r in rows), n),
    }
    for frame in FRAMES:
        out[f"acc@0.5[{frame}]"] = ratio(sum(r["correct_by_frame"][frame] for r in rows), n)
    return out


def _breakdown(questions: list[dict[str, Any]], rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for q, r in zip(questions, rows, strict=True):
        groups[group_key(q, (key,))].append(r)
    return {g: _summary(rs) for g, rs in sorted(groups.items())}


def _iou(pred: Box | None, gt: Box) -> float:
    return 0.0 if pred is None else float(iou_matrix([pred], [gt])[0, 0])


def score_refexp(
    questions: Sequence[dict[str, Any]],
    answers: Sequence[dict[str, Any]],
    box_frame: str | None = None,
    protocol: str = OURS.name,
    breakdowns: Sequence[str] = (),
) -> dict[str, Any]:
    """Metrics of ``answers`` on ``questions`` (see the module docstring); also the per-question rows and, for each
    question field in ``breakdowns`` (e.g. ``expression_type``, ``difficulty``), the metrics per value of it
    (``by[field][value]``; questions without the field under ``all``)."""
    if protocol not in PROTOCOLS:
        raise EvalError(f"--protocol {protocol!r}: expected one of {sorted(PROTOCOLS)}")
    rule = PROTOCOLS[protocol]
    by_id = answers_by_id(answers)
    failures = Failures()
    rows = []
    scored: list[dict[str, Any]] = []
    frames_used: set[str] = set()
    invalid_gt = 0
    for q in questions:
        qid = q.get("question_id")
        gt = _gt_box(q)
        size = image_size(q)
        if is_degenerate(gt):
            invalid_gt += 1
            failures.add(qid, f"degenerate ground-truth box {list(gt)} (question not scored)")
            continue
        frame = rule.frame or question_frame(q, box_frame)
        frames_used.add(frame)
        answer = by_id.get(str(qid))
        scored.append(q)
        row = {"question_id": qid, "group": group_key(q), "iou": 0.0, "correct": False, "parse_failure": False,
               "correct_by_frame": dict.fromkeys(FRAMES, False)}
        if answer is None:
            row["parse_failure"] = True
            failures.add(qid, NO_ANSWER)
            rows.append(row)
            continue
        text = str(answer.get("text", ""))
        try:
            preds = {f: predicted_box(rule, text, size, f) for f in FRAMES}
        except InferenceError as exc:
            raise EvalError(f"question {qid}: {exc}") from None
        pred, why = preds[frame]
        if pred is None:
            row["parse_failure"] = True
            failures.add(qid, why)
        else:
            row["pred_xyxy_px"] = list(pred)
            if is_degenerate(pred):
                shown = [round(v, 1) for v in pred]
                failures.add(qid, f"degenerate predicted box {shown} in {size[0]}x{size[1]} pixels")
            row["iou"] = _iou(pred, gt)
            row["correct"] = row["iou"] >= ACC_THRESHOLD
        row["correct_by_frame"] = {f: _iou(p, gt) >= ACC_THRESHOLD for f, (p, _) in preds.items()}
        rows.append(row)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    metrics = _summary(rows)
    n = metrics.pop("n")
    metrics["invalid_ground_truth"] = invalid_gt
    frame_used = frames_used.pop() if len(frames_used) == 1 else ("per question" if frames_used else "none")
    return {
        "benchmark": "refexp",
        "n": n,
        "protocol": rule.describe(frame_used),
        "headline": HEADLINE,
        "metrics": metrics,
        "by_group": {g: _summary(rs) for g, rs in sorted(groups.items())} if len(groups) > 1 else {},
        "by": {key: _breakdown(scored, rows, key) for key in breakdowns},
        "failures": failures.to_json(),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return scorer_main(score_refexp, __doc__, argv, protocols=list(PROTOCOLS))


if __name__ == "__main__":
    sys.exit(main())

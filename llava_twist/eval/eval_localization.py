"""Zero-shot localisation: find-all (and count) queries scored as detection with pycocotools, plus recall.

Each question is one query on one image with every matching ground-truth box (``gt_boxes_xyxy_px``,
possibly none) and a ``category``. COCO-format ground truth and detections are built in memory: every
question is its own COCO image, so a query is scored only against its own boxes. A detection's score is
its confidence from the token probabilities of its box text (``metadata.answer_box_scores``, written by
``model_grounding``) or, without them, its rank in the answer (first box highest).

Metrics: COCO ``AP`` (IoU 0.50:0.95), ``AP50``, ``AP75``, ``AR@100``; ``recall@0.5`` and
``precision@0.5`` from a greedy one-to-one matching per query; ``count_accuracy`` (as many boxes as
ground truth); ``parse_failure_rate`` (answers with no box although the query has ground truth).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from typing import Any

from llava_twist.eval.common import (
    NO_ANSWER,
    EvalError,
    Failures,
    answers_by_id,
    image_size,
    iou_matrix,
    parse_answer,
    question_frame,
    ratio,
    scorer_main,
)
from scout_data.boxes import xyxy_to_xywh

HEADLINE = ["AP", "AP50", "recall@0.5"]


def greedy_matches(iou: Any, threshold: float = 0.5) -> int:
    """One-to-one matches at ``iou >= threshold``, best pairs first."""
    iou = iou.clone()
    matched = 0
    while iou.numel() and float(iou.max()) >= threshold:
        i, j = divmod(int(iou.argmax()), iou.shape[1])
        matched += 1
        iou[i, :] = -1
        iou[:, j] = -1
    return matched


def box_scores(answer: dict[str, Any] | None, n: int) -> tuple[list[float], str]:
    """Confidence of each of ``n`` answer boxes: token probabilities when recorded, else rank."""
    scores = ((answer or {}).get("metadata") or {}).get("answer_box_scores")
    if isinstance(scores, list) and len(scores) == n and all(isinstance(s, int | float) for s in scores):
        return [float(s) for s in scores], "token_prob"
    return [1.0 - i / (n + 1) for i in range(n)], "rank"


def coco_ap(images: list[dict], categories: list[dict], gts: list[dict], dets: list[dict]) -> dict[str, float | None]:
    """COCO bbox AP/AR of ``dets`` against ``gts`` (built in memory; pycocotools' prints swallowed)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    keys = ("AP", "AP50", "AP75", "AR@100")
    if not gts:
        return dict.fromkeys(keys)
    if not dets:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "categories": categories, "annotations": gts}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) if s >= 0 else None for s in ev.stats]
    return dict(zip(keys, (stats[0], stats[1], stats[2], stats[8]), strict=True))


def score_localization(
    questions: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]], box_frame: str | None = None
) -> dict[str, Any]:
    by_id = answers_by_id(answers)
    failures = Failures()
    categories: dict[str, int] = {}
    images, gts, dets = [], [], []
    n_gt = n_pred = matched = count_ok = parse_failures = 0
    sources = set()
    for image_id, q in enumerate(questions, 1):
        qid = q.get("question_id")
        gt_boxes = q.get("gt_boxes_xyxy_px")
        if not isinstance(gt_boxes, list):
            raise EvalError(f"question {qid}: needs 'gt_boxes_xyxy_px' (a list of [x1, y1, x2, y2], maybe empty)")
        gt_boxes = [tuple(float(v) for v in b) for b in gt_boxes]
        w, h = image_size(q)
        cat = categories.setdefault(str(q.get("category", "object")), len(categories) + 1)
        images.append({"id": image_id, "width": w, "height": h})
        for b in gt_boxes:
            x, y, bw, bh = xyxy_to_xywh(b)
            gts.append({"id": len(gts) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, bw, bh],
                        "area": bw * bh, "iscrowd": 0})
        n_gt += len(gt_boxes)
        answer = by_id.get(str(qid))
        parsed = parse_answer(q, answer, question_frame(q, box_frame))
        preds = [] if parsed is None else parsed.answer_boxes_xyxy_px
        if parsed is None:
            failures.add(qid, NO_ANSWER)
        elif not preds and gt_boxes:
            failures.add(qid, parsed.miss_reason or "no box in the answer")
        if not preds and (gt_boxes or parsed is None):
            parse_failures += 1
        count_ok += len(preds) == len(gt_boxes)
        scores, source = box_scores(answer, len(preds))
        if preds:
            sources.add(source)
        n_pred += len(preds)
        matched += greedy_matches(iou_matrix(preds, gt_boxes))
        for b, s in zip(preds, scores, strict=True):
            x, y, bw, bh = xyxy_to_xywh(b)
            dets.append({"image_id": image_id, "category_id": cat, "bbox": [x, y, bw, bh], "score": s})
    cats = [{"id": i, "name": name} for name, i in categories.items()]
    metrics = coco_ap(images, cats, gts, dets)
    metrics.update({
        "recall@0.5": ratio(matched, n_gt),
        "precision@0.5": ratio(matched, n_pred),
        "count_accuracy": ratio(count_ok, len(questions)),
        "parse_failure_rate": ratio(parse_failures, len(questions)),
        "gt_boxes": n_gt,
        "predicted_boxes": n_pred,
        "score_source": "+".join(sorted(sources)) or None,
    })
    return {
        "benchmark": "localization",
        "n": len(questions),
        "headline": HEADLINE,
        "metrics": metrics,
        "failures": failures.to_json(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return scorer_main(score_localization, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())

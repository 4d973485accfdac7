"""Grounded captioning (Flickr30k Entities, SCOUT grounded captions): phrase recall at IoU 0.5.

Each question lists the ground-truth phrases of its caption with their boxes (``phrases: [{phrase,
boxes_xyxy_px}]``). The model writes its own caption with boxes; its answer boxes are mapped to pixels of
the original image (in the question's ``box_frame``).

- ``phrase_recall@0.5``: a ground-truth phrase is recalled when some predicted box has IoU >= 0.5 with
  one of its boxes (the any-box protocol of Flickr30k Entities).
- ``phrase_recall_text@0.5``: as above, and the caption text before that predicted box (back to the
  previous box) names the phrase's head word (its last word; plurals match).
- ``box_precision@0.5``: predicted boxes with IoU >= 0.5 against some ground-truth box.
- ``parse_failure_rate``: answers with no box (a miss for every phrase of the caption).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

from llava_twist.eval.common import (
    NO_ANSWER,
    EvalError,
    Failures,
    answers_by_id,
    iou_matrix,
    parse_answer,
    question_frame,
    ratio,
    scorer_main,
)
from scout_data.parse import BOX_RE

HEADLINE = ["phrase_recall@0.5", "phrase_recall_text@0.5", "box_precision@0.5"]
_WORD_RE = re.compile(r"[a-z0-9]+")


def head_word(phrase: str) -> str:
    words = _WORD_RE.findall(phrase.lower())
    return words[-1] if words else ""


def mentions(context: str, head: str) -> bool:
    """``head`` (or its plural) appears as a word in ``context``."""
    if not head:
        return False
    return re.search(rf"\b{re.escape(head)}(?:s|es)?\b", context.lower()) is not None


def box_contexts(answer_text: str) -> list[str]:
    """For each box in the answer text, the text between it and the previous box."""
    out, pos = [], 0
    for m in BOX_RE.finditer(answer_text):
        out.append(answer_text[pos : m.start()])
        pos = m.end()
    return out


def _phrases(question: dict[str, Any]) -> list[dict[str, Any]]:
    phrases = question.get("phrases")
    if not isinstance(phrases, list) or not all(isinstance(p, dict) and p.get("boxes_xyxy_px") for p in phrases):
        raise EvalError(f"question {question.get('question_id')}: needs 'phrases': [{{phrase, boxes_xyxy_px}}]")
    return phrases


def score_grounded_caption(
    questions: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]], box_frame: str | None = None
) -> dict[str, Any]:
    """Phrase recall / text-matched recall / box precision at IoU 0.5 (see the module docstring)."""
    by_id = answers_by_id(answers)
    failures = Failures()
    n_phrases = recalled = recalled_text = n_pred = pred_hits = parse_failures = 0
    for q in questions:
        qid = q.get("question_id")
        phrases = _phrases(q)
        n_phrases += len(phrases)
        parsed = parse_answer(q, by_id.get(str(qid)), question_frame(q, box_frame))
        if parsed is None or parsed.miss_reason:
            parse_failures += 1
            failures.add(qid, NO_ANSWER if parsed is None else parsed.miss_reason)
            continue
        preds = parsed.answer_boxes_xyxy_px
        contexts = box_contexts(parsed.chain.answer_text)
        if len(contexts) != len(preds):
            contexts = [parsed.chain.answer_text] * len(preds)
        n_pred += len(preds)
        all_gt = [tuple(b) for p in phrases for b in p["boxes_xyxy_px"]]
        pred_hits += int((iou_matrix(preds, all_gt).max(dim=1).values >= 0.5).sum()) if all_gt else 0
        for p in phrases:
            hits = (iou_matrix(preds, [tuple(b) for b in p["boxes_xyxy_px"]]) >= 0.5).any(dim=1).tolist()
            if any(hits):
                recalled += 1
                head = head_word(str(p.get("phrase", "")))
                if any(hit and mentions(ctx, head) for hit, ctx in zip(hits, contexts, strict=True)):
                    recalled_text += 1
    return {
        "benchmark": "grounded_caption",
        "n": len(questions),
        "headline": HEADLINE,
        "metrics": {
            "phrase_recall@0.5": ratio(recalled, n_phrases),
            "phrase_recall_text@0.5": ratio(recalled_text, n_phrases),
            "box_precision@0.5": ratio(pred_hits, n_pred),
            "parse_failure_rate": ratio(parse_failures, len(questions)),
            "phrases": n_phrases,
            "predicted_boxes": n_pred,
        },
        "failures": failures.to_json(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return scorer_main(score_grounded_caption, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Retention against the base model: the same LLaVA ``model_vqa`` question file answered by base LLaVA and by
TWIST (``auto`` route). This is how "no forgetting" is reported.

- ``identical_rate``: answers with exactly the same text (overall, and among prompts the router sent down
  the frozen route, where TWIST runs the original computation and must be 100% identical);
- per benchmark (the question's ``benchmark``, else ``category``, else ``all``) where ground truth exists
  (``answer``, ``gt_answer`` or ``label``): accuracy of both and the delta (TWIST - base), by normalised
  exact match (lower case, punctuation and articles removed);
- the router's decisions: routes taken and a histogram of its probability.

    python -m llava_twist.eval.eval_retention --question-file q.jsonl --base-answers base.jsonl \\
        --twist-answers twist.jsonl
"""

from __future__ import annotations

import argparse
import os
import re
import string
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from llava_twist.eval.common import (
    EvalError,
    answers_by_id,
    default_result_file,
    format_metrics,
    group_key,
    ratio,
    read_answers,
    read_questions,
    result_target,
    write_result,
)

HEADLINE = ["identical_rate", "frozen_route_rate"]
GT_KEYS = ("answer", "gt_answer", "label")
BINS = 10
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCT))
    return " ".join(text.split())


def is_correct(prediction: str, gt: Any) -> bool:
    """Normalised exact match against the ground truth (a string or a list of accepted answers)."""
    accepted = gt if isinstance(gt, list) else [gt]
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in accepted)


def _ground_truth(question: dict[str, Any]) -> Any:
    for key in GT_KEYS:
        if question.get(key) not in (None, ""):
            return question[key]
    return None


def score_retention(
    questions: Sequence[dict[str, Any]], base_answers: Sequence[dict[str, Any]], twist_answers: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    base, twist = answers_by_id(base_answers), answers_by_id(twist_answers)
    rows = []
    missing = Counter()
    for q in questions:
        qid = str(q.get("question_id"))
        if qid not in base or qid not in twist:
            missing["base" if qid not in base else "twist"] += 1
            continue
        meta = twist[qid].get("metadata") or {}
        rows.append({
            "group": group_key(q, ("benchmark", "category")),
            "identical": str(base[qid].get("text", "")).strip() == str(twist[qid].get("text", "")).strip(),
            "route": meta.get("route") or "unknown",
            "prob": meta.get("router_prob"),
            "gt": _ground_truth(q),
            "base": str(base[qid].get("text", "")),
            "twist": str(twist[qid].get("text", "")),
        })
    if not rows:
        raise EvalError("no question has an answer in both answers files (do their question ids match?)")
    routes = Counter(r["route"] for r in rows)
    hist = [0] * BINS
    for r in rows:
        if isinstance(r["prob"], int | float):
            hist[min(BINS - 1, max(0, int(r["prob"] * BINS)))] += 1
    frozen = [r for r in rows if r["route"] == "frozen"]
    grounding = [r for r in rows if r["route"] == "grounding"]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    by_group = {}
    for g, rs in sorted(groups.items()):
        entry: dict[str, Any] = {"n": len(rs), "identical_rate": ratio(sum(r["identical"] for r in rs), len(rs))}
        scored = [r for r in rs if r["gt"] is not None]
        if scored:
            acc_base = ratio(sum(is_correct(r["base"], r["gt"]) for r in scored), len(scored))
            acc_twist = ratio(sum(is_correct(r["twist"], r["gt"]) for r in scored), len(scored))
            entry.update({"with_gt": len(scored), "acc_base": acc_base, "acc_twist": acc_twist,
                          "acc_delta": acc_twist - acc_base})
        by_group[g] = entry
    return {
        "benchmark": "retention",
        "n": len(rows),
        "headline": HEADLINE,
        "metrics": {
            "identical_rate": ratio(sum(r["identical"] for r in rows), len(rows)),
            "identical_rate_frozen_route": ratio(sum(r["identical"] for r in frozen), len(frozen)),
            "identical_rate_grounding_route": ratio(sum(r["identical"] for r in grounding), len(grounding)),
            "frozen_route_rate": ratio(len(frozen), len(rows)),
            "unanswered": dict(missing),
        },
        "routes": dict(routes.most_common()),
        "router_prob_histogram": {f"{i / BINS:.1f}-{(i + 1) / BINS:.1f}": n for i, n in enumerate(hist)},
        "by_group": by_group,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llava_twist.eval.eval_retention", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--question-file", required=True)
    p.add_argument("--base-answers", required=True, help="answers of the base LLaVA model")
    p.add_argument("--twist-answers", required=True, help="answers of TWIST (auto route)")
    p.add_argument("--result-file", default=None, help="default: <twist-answers stem>.retention.result.json")
    p.add_argument("--name", default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --result-file that is not a scorer's result (a scorer's own is replaced)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.result_file or default_result_file(args.twist_answers).replace(".result.json", ".retention.result.json")
    try:
        result_target(path, [args.question_file, args.base_answers, args.twist_answers], args.overwrite)
        result = score_retention(
            read_questions(args.question_file),
            read_answers(args.base_answers, "base answers file"),
            read_answers(args.twist_answers, "TWIST answers file"),
        )
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.update(
        name=args.name or os.path.basename(args.twist_answers),
        question_file=os.path.abspath(args.question_file),
        base_answers=os.path.abspath(args.base_answers),
        twist_answers=os.path.abspath(args.twist_answers),
    )
    write_result(path, result)
    print(format_metrics(result))
    print(f"  routes: {result['routes']}; router probability histogram: {result['router_prob_histogram']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

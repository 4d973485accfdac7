"""Scoring the demo's answers: Acc@0.5 by the project's scorers (by expression type and difficulty too),
understanding accuracy, the router, the prompt chosen on dev, and paired comparisons (``llava_twist.eval.paired``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from llava_twist.eval.common import answers_by_id
from llava_twist.eval.eval_refexp import score_refexp
from llava_twist.eval.eval_retention import is_correct
from llava_twist.eval.paired import paired_difference
from llava_twist.model.routes import TASK_ROUTE
from playground.miniature.answering import HEADLINE_SET, PROMPTS, REFEXP_SETS, UNDERSTANDING


def refexp_scores(questions: list[dict[str, Any]], answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Acc@0.5, mean IoU and unparseable answers, by expression type and difficulty too (the scorer's
    breakdowns, their ``n`` and Acc@0.5), with each question's right/wrong."""
    result = score_refexp(questions, answers, breakdowns=("expression_type", "difficulty"))
    by = {key: {g: {"n": m["n"], "acc@0.5": m["acc@0.5"]} for g, m in groups.items()}
          for key, groups in result["by"].items()}
    return {"n": result["n"], **{k: result["metrics"][k] for k in ("acc@0.5", "mean_iou", "parse_failure_rate")},
            "by_type": by["expression_type"], **by["difficulty"],
            "correct": {str(r["question_id"]): bool(r["correct"]) for r in result["rows"]},
            "type_of": {str(q["question_id"]): str(q.get("expression_type") or "other") for q in questions}}


def understanding_scores(questions: list[dict[str, Any]], answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy of short answers to the understanding questions, by question type, with each
    question's right/wrong."""
    by_id = answers_by_id(answers)
    correct = {q["question_id"]: is_correct(str(by_id.get(q["question_id"], {}).get("text", "")), q.get("answer", ""))
               for q in questions}
    by_type: dict[str, list[bool]] = {}
    for q in questions:
        by_type.setdefault(q.get("question_type") or "other", []).append(correct[q["question_id"]])
    return {"n": len(questions), "accuracy": _mean(list(correct.values())),
            "by_type": {t: {"n": len(v), "accuracy": _mean(v)} for t, v in sorted(by_type.items())},
            "correct": correct}


def _mean(values: list[bool] | list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def router_scores(answers: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The route TWIST chose (auto) on every held-out prompt against its task: referring expressions (either
    prompt) should take the grounding route, understanding questions the frozen one."""
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for prompt, rows in answers.items():
        task = UNDERSTANDING if prompt == UNDERSTANDING else "grounding"
        for row in rows:
            total[task] += 1
            right[task] += (row.get("metadata") or {}).get("route") == TASK_ROUTE[task]
    n = sum(total.values())
    return {"n": n, "accuracy": sum(right.values()) / n if n else None,
            "by_task": {t: {"n": total[t], "accuracy": right[t] / total[t] if total[t] else None} for t in TASK_ROUTE}}


def choose_prompt(by_prompt: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The prompt with the higher dev Acc@0.5 (``rec`` on ties)."""
    return max(PROMPTS, key=lambda p: (by_prompt[p]["dev"]["acc@0.5"] or 0.0, p == "rec"))


def compare(a: dict[str, bool], b: dict[str, bool], seed: int) -> dict[str, Any]:
    """The paired difference ``a - b`` of two models' right/wrong answers to the same questions."""
    ids = sorted(a)
    if set(ids) != set(b):
        raise ValueError("compared models did not answer the same questions")
    return paired_difference([a[i] for i in ids], [b[i] for i in ids], seed=seed)


def score_model(questions: dict[str, list[dict[str, Any]]], answers: dict[str, list[dict[str, Any]]]
                ) -> dict[str, Any]:
    """Every score of one model: per prompt and held-out set, the prompt chosen on dev, understanding."""
    refexp: dict[str, dict[str, Any]] = {}
    for prompt in PROMPTS:
        refexp[prompt] = {s: refexp_scores(questions[s], answers[prompt]) for s in REFEXP_SETS}
    chosen = choose_prompt(refexp)
    return {"refexp": refexp, "prompt": chosen, "headline": refexp[chosen][HEADLINE_SET],
            UNDERSTANDING: understanding_scores(questions[UNDERSTANDING], answers[UNDERSTANDING])}


def identical_rate(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """How many understanding answers are, to the character, the base's."""
    a, b = answers_by_id(base), answers_by_id(other)
    same = [str(a[q].get("text", "")).strip() == str(b.get(q, {}).get("text", "")).strip() for q in a]
    return {"n": len(same), "identical_rate": _mean(same)}


def summary(scores: dict[str, Any]) -> dict[str, Any]:
    """Scores without the per-question right/wrong and types (which ``metrics.json`` keeps)."""
    return {k: v for k, v in scores.items() if k not in ("correct", "type_of")}

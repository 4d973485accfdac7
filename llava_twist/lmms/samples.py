"""lmms-eval's ``--log_samples`` file of an offline task as LLaVA's answer JSONL, for this project's scorers:

    python -m llava_twist.lmms.samples --samples out/MODEL/DATE_samples_twist_rec.jsonl \\
        --question-file questions.jsonl --answers-file answers.jsonl
    python -m llava_twist.eval.eval_refexp --protocol lmms-eval --question-file questions.jsonl \\
        --answers-file answers.jsonl

A sample's ``doc_id`` is its question's line among the question file's records (lmms-eval reads the file in order);
its response is ``filtered_resps``; ``--model llava_twist`` logs the route and the router's probability in
``token_counts``, which become the answer's ``metadata`` (``route``, ``router_prob``), as this project's answers
carry them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from llava_twist.eval.common import EvalError, read_jsonl, read_questions
from scout_data.output import OutputError, atomic_write_text, check_output


def _response(sample: dict[str, Any], where: str) -> str:
    resp = sample.get("filtered_resps")
    while isinstance(resp, list) and len(resp) == 1:
        resp = resp[0]
    if not isinstance(resp, str):
        raise EvalError(f"{where}: 'filtered_resps' is not one response: {json.dumps(resp)[:80]}")
    return resp


def sample_route(sample: dict[str, Any]) -> tuple[str | None, float | None]:
    """The route and router probability ``--model llava_twist`` logged for ``sample`` (Nones for other models)."""
    counts = sample.get("token_counts")
    entry = counts[0] if isinstance(counts, list) and counts else None
    if not isinstance(entry, dict):
        return None, None
    return entry.get("twist_route"), entry.get("router_prob")


def answers_from_samples(samples: Sequence[dict[str, Any]], questions: Sequence[dict[str, Any]],
                         model_id: str = "lmms-eval", where: str = "samples") -> list[dict[str, Any]]:
    """One LLaVA answer per sample, joined to its question by ``doc_id`` (see the module docstring)."""
    answers = []
    for n, sample in enumerate(samples, 1):
        doc_id = sample.get("doc_id")
        if isinstance(doc_id, bool) or not isinstance(doc_id, int) or not 0 <= doc_id < len(questions):
            raise EvalError(f"{where}:{n}: doc_id {doc_id!r} is not a record of the question file "
                            f"({len(questions)} questions); was it made from another file?")
        route, prob = sample_route(sample)
        question = questions[doc_id]
        answers.append({"question_id": question["question_id"], "prompt": sample.get("input", ""),
                        "text": _response(sample, f"{where}:{n}"), "model_id": model_id,
                        "metadata": {"route": route, "router_prob": prob}})
    return answers


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_twist.lmms.samples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="lmms-eval's <date>_samples_<task>.jsonl")
    p.add_argument("--question-file", required=True, help="the question file the task read")
    p.add_argument("--answers-file", required=True)
    p.add_argument("--model-id", default="lmms-eval")
    p.add_argument("--overwrite", action="store_true", help="replace an --answers-file")
    args = p.parse_args(argv)
    try:
        check_output(args.answers_file, [args.samples, args.question_file], args.overwrite, "--answers-file")
        answers = answers_from_samples(read_jsonl(args.samples, "samples file"), read_questions(args.question_file),
                                       args.model_id, args.samples)
    except (EvalError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.answers_file)), exist_ok=True)
    atomic_write_text(args.answers_file, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
    print(f"wrote {args.answers_file}: {len(answers)} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())

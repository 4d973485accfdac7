"""Shared pieces of the evaluation scripts: JSONL I/O, joining answers to questions, IoU, result files.

The question and answer JSONL schema has one owner here: :func:`read_questions` and :func:`read_answers` check a
file at the boundary (UTF-8, one object per line, ``question_id`` present, of one type and unique, box fields
``*_xyxy_px`` / ``*_xyxy_norm`` of four numbers) and name the file, line and field of the first problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import reprlib
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torchvision.ops import box_iou

from llava_twist.serve.result import InferenceError, InferenceResult, result_from_text
from scout_data.boxes import FRAMES, Box, box_field_problem, is_degenerate
from scout_data.inputs import InputError, read_input
from scout_data.output import atomic_write_text, reason_key

MAX_EXAMPLES = 5
NO_ANSWER = "no answer for this question in the answers file"


class EvalError(Exception):
    """A problem with the inputs (missing file, malformed line): reported as a message, not a traceback."""


def _jsonl_lines(path: str, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; a line that is not UTF-8 JSON of an object is an error
    naming the file and line. Lines end in ``\\n`` only (answers may hold U+2028 and friends)."""
    try:
        raw = read_input(path, what=what)
    except FileNotFoundError:
        raise EvalError(f"{what} {path}: not found") from None
    except (InputError, OSError) as exc:
        raise EvalError(str(exc)) from None
    for n, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EvalError(f"{path}:{n}: not UTF-8 (byte {chunk[exc.start]:#04x} at column {exc.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
        except RecursionError:
            raise EvalError(f"{path}:{n}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{n}: expected a JSON object per line")
        yield n, row


def read_jsonl(path: str, what: str = "file") -> list[dict[str, Any]]:
    """Every JSON object in a JSONL file; a line that is not UTF-8 JSON of an object is an error naming the file
    and line. No schema: :func:`read_questions` and :func:`read_answers` check theirs."""
    return [row for _, row in _jsonl_lines(path, what)]


def _unique_ids(path: str, lines: Sequence[tuple[int, dict[str, Any]]], what: str) -> None:
    """Every line has a ``question_id`` (a string or an integer), all of one type, none twice: the scorers join on
    ``str(question_id)``, so ``1`` and ``"1"``, or a repeated id, would silently let one line stand for another."""
    seen: dict[str, int] = {}
    kind: tuple[type, int] | None = None
    for n, row in lines:
        if "question_id" not in row:
            raise EvalError(f"{path}:{n}: {what} has no 'question_id'")
        qid = row["question_id"]
        shown = reprlib.repr(qid)
        if isinstance(qid, bool) or not isinstance(qid, str | int):
            raise EvalError(f"{path}:{n}: question_id {shown} must be a string or an integer")
        if kind is None:
            kind = (type(qid), n)
        elif type(qid) is not kind[0]:
            raise EvalError(f"{path}:{n}: question_id {shown} is a {type(qid).__name__}, but line {kind[1]}'s is a "
                            f"{kind[0].__name__}; ids of mixed types collide")
        if str(qid) in seen:
            raise EvalError(f"{path}:{n}: question_id {shown} repeats line {seen[str(qid)]}'s; each {what} needs its "
                            "own id")
        seen[str(qid)] = n


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _question_problem(q: dict[str, Any]) -> str | None:
    """The first field of question ``q`` that does not hold what it says, or None."""
    for key in ("image", "text"):
        if key in q and not isinstance(q[key], str):
            return f"field {key!r} must be a string, got {reprlib.repr(q[key])}"
    for key in ("width", "height"):
        if key in q and not (_number(q[key]) and q[key] > 0 and float(q[key]).is_integer()):
            return f"field {key!r} must be a positive integer, got {reprlib.repr(q[key])}"
    if "box_frame" in q and q["box_frame"] not in FRAMES:
        return f"field 'box_frame' is {reprlib.repr(q['box_frame'])}, not one of {', '.join(FRAMES)}"
    return box_field_problem(q)


def read_questions(path: str, what: str = "question file") -> list[dict[str, Any]]:
    """A question file, checked: ids present, of one type and unique; ``image``/``text`` strings; ``width``/
    ``height`` positive integers; ``box_frame`` a frame; every box field four numbers (see :func:`read_jsonl`)."""
    return _checked_lines(path, what, "question", _question_problem)


def _checked_lines(path: str, what: str, kind: str, problem_of: Callable[[dict[str, Any]], str | None]
                   ) -> list[dict[str, Any]]:
    """The lines of a JSONL file of ``kind`` (question or answer) records: unique ids, each line's fields checked by
    ``problem_of``; the first problem is an :class:`EvalError` naming the file, line and id."""
    lines = list(_jsonl_lines(path, what))
    _unique_ids(path, lines, kind)
    for n, row in lines:
        if problem := problem_of(row):
            raise EvalError(f"{path}:{n}: {kind} {reprlib.repr(row['question_id'])}: {problem}")
    return [row for _, row in lines]


def _answer_problem(a: dict[str, Any]) -> str | None:
    """The first field of answer ``a`` that does not hold what LLaVA's answer JSONL holds there, or None."""
    if not isinstance(a.get("text"), str):
        return f"field 'text' must be the answer's text, got {reprlib.repr(a.get('text'))}"
    meta = a.get("metadata")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        return f"field 'metadata' must be an object, got {reprlib.repr(meta)}"
    if meta.get("route") is not None and not isinstance(meta["route"], str):
        return f"field 'metadata.route' must be a string, got {reprlib.repr(meta['route'])}"
    prob = meta.get("router_prob")
    if prob is not None and not (_number(prob) and 0 <= prob <= 1):
        return f"field 'metadata.router_prob' must be a probability, got {reprlib.repr(prob)}"
    return None


def read_answers(path: str, what: str = "answers file") -> list[dict[str, Any]]:
    """An answers file, checked: each line answers one ``question_id`` (of one type), no question twice, with its
    ``text`` and, where present, ``metadata`` (route, router probability) of the types LLaVA's answer JSONL has."""
    return _checked_lines(path, what, "answer", _answer_problem)


def default_result_file(answers_file: str) -> str:
    """``answers.jsonl`` -> ``answers.result.json`` (what :mod:`llava_twist.eval.summary` collects)."""
    stem = answers_file[: -len(".jsonl")] if answers_file.endswith(".jsonl") else answers_file
    return stem + ".result.json"


def answers_by_id(answers: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Answers keyed by ``str(question_id)`` (:func:`read_answers` has refused a file answering one twice)."""
    return {str(a.get("question_id")): a for a in answers}


def question_frame(question: dict[str, Any], override: str | None) -> str:
    frame = override or question.get("box_frame") or "padded"
    if frame not in FRAMES:
        raise EvalError(f"question {question.get('question_id')}: box_frame {frame!r} is not one of {FRAMES}")
    return frame


def image_size(question: dict[str, Any]) -> tuple[int, int]:
    try:
        w, h = int(question["width"]), int(question["height"])
    except (KeyError, TypeError, ValueError):
        raise EvalError(f"question {question.get('question_id')}: needs integer 'width' and 'height'") from None
    if w <= 0 or h <= 0:
        raise EvalError(f"question {question.get('question_id')}: image size {w}x{h} is not positive")
    return w, h


def parse_answer(question: dict[str, Any], answer: dict[str, Any] | None, frame: str) -> InferenceResult | None:
    """The parsed answer with boxes in original-image pixels, or None when the question has no answer."""
    if answer is None:
        return None
    try:
        return result_from_text(str(answer.get("text", "")), image_size(question), frame)
    except InferenceError as exc:
        raise EvalError(str(exc)) from None


def iou_matrix(boxes_a: Sequence[Box], boxes_b: Sequence[Box]) -> torch.Tensor:
    """Pairwise IoU (``torchvision.ops.box_iou``) of pixel xyxy boxes; a degenerate box has IoU 0 with all."""
    a = torch.tensor([list(b) for b in boxes_a], dtype=torch.float64).reshape(-1, 4)
    b = torch.tensor([list(x) for x in boxes_b], dtype=torch.float64).reshape(-1, 4)
    if a.numel() == 0 or b.numel() == 0:
        return torch.zeros((a.shape[0], b.shape[0]), dtype=torch.float64)
    iou = box_iou(a, b)
    bad_a = torch.tensor([is_degenerate(x) for x in boxes_a], dtype=torch.bool)
    bad_b = torch.tensor([is_degenerate(x) for x in boxes_b], dtype=torch.bool)
    iou[bad_a, :] = 0.0
    iou[:, bad_b] = 0.0
    return torch.nan_to_num(iou, nan=0.0)


class Failures:
    """Counts of why predictions were misses, with a few examples each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, question_id: Any, reason: str) -> None:
        key = reason_key(reason)
        self.counts[key] += 1
        ex = self.examples.setdefault(key, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(f"{question_id}: {reason}")

    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {"by_reason": dict(self.counts.most_common()), "examples": self.examples}


def ratio(num: float, den: float) -> float | None:
    return float(num) / den if den else None


def group_key(question: dict[str, Any], keys: Sequence[str] = ("subset", "benchmark", "category")) -> str:
    for key in keys:
        if question.get(key) not in (None, ""):
            return str(question[key])
    return "all"


def write_result(path: str, result: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def format_metrics(result: dict[str, Any]) -> str:
    lines = [f"{result['benchmark']}: {result.get('name', '')} ({result['n']} questions)"]
    if "protocol" in result:
        rule = result["protocol"]
        lines.append(f"  protocol: {rule['name']} ({rule['rule']}; frame {rule['frame']}, IoU >= {rule['threshold']})")
    for key, value in result["metrics"].items():
        lines.append(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    for group, metrics in result.get("by_group", {}).items():
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        lines.append(f"  [{group}] {shown}")
    fails = result.get("failures", {}).get("by_reason", {})
    if fails:
        lines.append("  misses by reason:")
        lines += [f"    {n} x {reason}" for reason, n in fails.items()]
    return "\n".join(lines)


def add_io_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--result-file", default=None, help="default: <answers-file stem>.result.json")
    parser.add_argument("--name", default=None, help="name of this result in summaries (default: the answers file)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a --result-file that is not a scorer's result (a scorer's own is replaced)")


def is_result_file(path: str) -> bool:
    """Whether ``path`` is a result JSON a scorer wrote (one a rerun may replace)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "metrics" in data and "question_file" in data


def result_target(path: str, inputs: Sequence[str], overwrite: bool) -> str:
    """``path`` once it is safe to write: never an input, never a file a scorer did not write (without
    ``overwrite``); :class:`EvalError` otherwise."""
    from scout_data.output import OutputError, check_output

    try:
        check_output(path, inputs, overwrite, "--result-file", made_here=is_result_file)
    except OutputError as exc:
        raise EvalError(str(exc)) from None
    return path


def run_main(fn: Callable[[argparse.Namespace], dict[str, Any]], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse, score, write the result JSON, print the metrics; input problems exit 2 with a message."""
    args = parser.parse_args(argv)
    try:
        path = result_target(args.result_file or default_result_file(args.answers_file),
                             [args.question_file, args.answers_file], args.overwrite)
        result = fn(args)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.setdefault("name", args.name or os.path.basename(args.answers_file))
    result["answers_file"] = os.path.abspath(args.answers_file)
    result["question_file"] = os.path.abspath(args.question_file)
    write_result(path, result)
    print(format_metrics(result))
    print(f"wrote {path}")
    return 0


def scorer_main(
    score: Callable[..., dict[str, Any]], doc: str | None, argv: Sequence[str] | None,
    protocols: Sequence[str] | None = None,
) -> int:
    """The command line of a box scorer: ``score(questions, answers, frame_override[, protocol=])`` -> result."""
    spec = getattr(sys.modules.get(score.__module__), "__spec__", None)  # run with -m, __name__ is "__main__"
    parser = argparse.ArgumentParser(prog=f"python -m {spec.name}" if spec else None, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(parser)
    parser.add_argument("--box-frame", choices=FRAMES, default=None, help="override the questions' box_frame")
    if protocols:
        parser.add_argument("--protocol", choices=protocols, default=protocols[0],
                            help=f"the scoring rule the numbers follow (default: {protocols[0]})")

    def run(args: argparse.Namespace) -> dict[str, Any]:
        extra = {"protocol": args.protocol} if protocols else {}
        questions, answers = read_questions(args.question_file), read_answers(args.answers_file)
        try:
            result = score(questions, answers, args.box_frame, **extra)
        except EvalError as exc:  # a question the scorer cannot use ("question ID: ..."): name its file
            raise EvalError(f"{args.question_file}: {exc}") from None
        result.pop("rows", None)
        return result

    return run_main(run, parser, argv)

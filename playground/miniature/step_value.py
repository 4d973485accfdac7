"""What a chain's steps are worth to a model: its deciding step (``the one it asks for: [...]``) answered after the
reference chain's own steps, right by construction (the candidates and the reference object as the held-out
record writes them), after the same steps with every box swapped for one from another chain, and as a chain's
first step (no steps before it), each against its one-shot answer to the same expression; paired on the demo's
test expressions, overall and by type.

If right steps lift the deciding step above the one-shot answer, a model that learns to write them gains by
writing them. If they do not, no chain it writes can pay (docs/demo-notes.md, "Steps that pay, third round").
TWIST answers on its grounding route, the route its router gives each of these questions.

    python -m playground.miniature.step_value --out playground/data/demo [--model twist] [--limit 1200]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llava_twist.eval.common import parse_answer, question_frame, read_jsonl
from llava_twist.eval.paired import describe
from llava_twist.model.routes import Route
from llava_twist.serve.generation import GenerationSettings, StreamRow, stream_rows
from llava_twist.serve.loading import LoadedModel, load_model
from llava_twist.serve.prompting import build_prompt, load_image
from llava_twist.serve.result import InferenceResult
from playground.miniature.answering import (
    HEADLINE_SET,
    answers_file,
    evaluated_models,
    heldout_records,
    question_dir,
)
from playground.miniature.chain_misses import HIT
from playground.miniature.recipe import get_recipe
from playground.miniature.runner import Layout
from playground.miniature.scoring import compare, refexp_scores
from scout_data.boxes import iou
from scout_data.chain import DECIDE_SEPARATOR, PICK, step_line
from scout_data.limits import OneLineParser
from scout_data.output import atomic_write_text

CONTEXTS = ("right_steps", "swapped_boxes", "no_steps")
BOX_TEXT = re.compile(r"\[[^\[\]]*\]")
DECIDING = f"{PICK}{DECIDE_SEPARATOR}"


def steps_before_pick(chain: str) -> str | None:
    """A chain's text up to and including ``the one it asks for:``, or None when it has no such step."""
    at = chain.find(DECIDING)
    return None if at < 0 else chain[: at + len(DECIDING)]


def swap_boxes(text: str, pool: Sequence[str], rng: random.Random) -> str:
    """``text`` with each ``[...]`` box replaced by one drawn from ``pool`` (box texts of other chains)."""
    return BOX_TEXT.sub(lambda _: rng.choice(pool), text)


def contexts(questions: Sequence[dict[str, Any]], records: dict[str, dict[str, Any]], seed: int = 0
             ) -> dict[str, dict[str, str]]:
    """Per context, the steps each question's deciding step is asked after (questions whose reference chain
    has a deciding step); swapped boxes come from the other questions' chains; with no steps, the deciding step is
    the chain's first (a chain no source writes: what the step-by-step prompt gives without the steps)."""
    right = {}
    for q in questions:
        chain = records[str(q["question_id"])]["conversations"][1]["value"]
        if (steps := steps_before_pick(chain)) is not None:
            right[str(q["question_id"])] = steps
    rng = random.Random(seed)
    swapped = {}
    for qid, steps in right.items():
        pool = [b for other, s in right.items() if other != qid for b in BOX_TEXT.findall(s)]
        swapped[qid] = swap_boxes(steps, pool, rng) if pool else steps
    alone = {qid: step_line(1, DECIDING) for qid in right}
    return {"right_steps": right, "swapped_boxes": swapped, "no_steps": alone}


def answer_after(loaded: LoadedModel, questions: Sequence[dict[str, Any]], steps: dict[str, str], image_folder: Path,
                 batch: int = 16, progress: bool = True) -> dict[str, InferenceResult]:
    """Each question's continuation after its ``steps`` (greedy, TWIST on its grounding route)."""
    asked = [q for q in questions if str(q["question_id"]) in steps]
    route = Route.GROUNDING if loaded.is_twist else Route.AUTO
    mm_start_end = bool(getattr(loaded.model.config, "mm_use_im_start_end", False))
    results: dict[str, InferenceResult] = {}
    for start in tqdm(range(0, len(asked), batch), desc="deciding steps", disable=not progress, unit="batch"):
        rows = []
        for q in asked[start:start + batch]:
            qid = str(q["question_id"])
            prompt = f"{build_prompt(q['text'], mm_use_im_start_end=mm_start_end)} {steps[qid]}"
            rows.append(StreamRow(prompt, load_image(str(image_folder / q["image"])), _keep(results, qid), route, 24))
        stream_rows(loaded, rows, GenerationSettings(max_new_tokens=24))
    return results


def _keep(results: dict[str, InferenceResult], qid: str):
    """A row's ``emit``: keeps its result, drops its text pieces."""
    def emit(item: Any) -> None:
        if isinstance(item, InferenceResult):
            results[qid] = item
    return emit


def pick_right(question: dict[str, Any], steps: str, result: InferenceResult | None) -> bool:
    """Whether the deciding step's box, in the chain ``steps`` + the model's continuation, is on the target."""
    if result is None:
        return False
    chain = parse_answer(question, {"text": f"{steps} {result.text}"}, question_frame(question, None))
    last = max((b.step for b in chain.boxes if b.step is not None), default=None)
    picked = [b for b in chain.boxes if last is not None and b.step == last]
    return bool(picked) and iou(picked[0].box_xyxy_px, question["bbox_xyxy_px"]) >= HIT


def step_value(loaded: LoadedModel, questions: Sequence[dict[str, Any]], records: dict[str, dict[str, Any]],
               one_shot: dict[str, bool], image_folder: Path, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The deciding step's accuracy in each context against the one-shot answers, paired, overall and by type."""
    steps = contexts(questions, records, seed)
    asked = [q for q in questions if str(q["question_id"]) in steps["right_steps"]]
    types = {str(q["question_id"]): str(q.get("expression_type") or "other") for q in asked}
    right = {}
    for name in CONTEXTS:
        got = answer_after(loaded, asked, steps[name], image_folder, progress=progress)
        right[name] = {qid: pick_right(q, steps[name][qid], got.get(qid))
                       for q in asked if (qid := str(q["question_id"]))}
    out: dict[str, Any] = {}
    for group in ("all", *sorted(set(types.values()))):
        ids = [i for i in types if group in ("all", types[i])]
        row: dict[str, Any] = {"n": len(ids), "one_shot": _rate(one_shot, ids)}
        for name in CONTEXTS:
            row[name] = _rate(right[name], ids)
            row[f"{name}_vs_one_shot"] = compare({i: right[name][i] for i in ids}, {i: one_shot[i] for i in ids}, seed)
        out[group] = row
    return out


def _rate(correct: dict[str, bool], ids: Sequence[str]) -> float | None:
    return sum(correct[i] for i in ids) / len(ids) if ids else None


def run(out: Path, model: str = "twist", limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`step_value` for one model of a finished ``make demo`` folder (its test expressions, its one-shot
    answers); written to ``work/eval/step_value-MODEL.json``."""
    layout = Layout(out)
    found = {m.name: m for m in evaluated_models(get_recipe("full"), layout)}
    if model not in found or not found[model].folder.is_dir():
        have = ", ".join(n for n, m in found.items() if m.folder.is_dir()) or "none"
        raise ValueError(f"{out}: no trained model {model!r} (have: {have})")
    questions_path = question_dir(layout) / f"refexp-{HEADLINE_SET}.jsonl"
    one_shot_path = answers_file(layout, model, "rec")
    for path in (questions_path, one_shot_path):
        if not path.is_file():
            raise ValueError(f"{path}: missing; run the demo's eval stage first (make demo)")
    questions = read_jsonl(str(questions_path), "questions")[:limit]
    records = {f"{HEADLINE_SET}/{r['id']}": r for r in heldout_records(layout, HEADLINE_SET)}
    one_shot = refexp_scores(questions, read_jsonl(str(one_shot_path), "answers"))["correct"]
    m = found[model]
    loaded = (load_model(str(m.folder), str(layout.model("base")), device="cpu") if m.twist
              else load_model(str(m.folder), device="cpu", model_class="llava"))
    result = {"model": model, **step_value(loaded, questions, records, one_shot, layout.data, progress=progress)}
    atomic_write_text(str(layout.eval / f"step_value-{model}.json"), json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    lines = ["| type | n | one-shot | the deciding step (each against one-shot): after the right steps "
             "| after the steps with swapped boxes | with no steps before it |", "|---|---|---|---|---|---|"]
    for group, row in result.items():
        if group == "model":
            continue
        cells = [f"{100 * row['one_shot']:.1f}%"]
        for name in CONTEXTS:
            cells.append(f"{100 * row[name]:.1f}%: {describe(row[f'{name}_vs_one_shot'])}")
        lines.append(f"| {group} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="python -m playground.miniature.step_value", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a make demo folder (playground/data/demo)")
    p.add_argument("--model", default="twist", help="the model's name in the report (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="the first N test expressions (default: all)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        result = run(Path(args.out), args.model, args.limit, not args.no_progress)
    except ValueError as exc:
        p.exit(2, f"step_value: {exc}\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

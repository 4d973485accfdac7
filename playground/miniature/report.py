"""The demo's deliverables in ``--out``: ``report.md`` (``markdown``), ``grid.png`` (``grid``), ``results.json`` and
``playground.json`` (the best TWIST variant, for ``make playground``, with example scenes of its world)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llava_twist.eval.common import read_jsonl
from llava_twist.eval.prompts import question_prompt
from playground.make_examples import write_record_examples
from playground.miniature.answering import (
    HEADLINE_SET,
    PROMPTS,
    evaluated_models,
    heldout_folder,
    heldout_records,
    question_dir,
)
from playground.miniature.checks import best_twist, twist_checks
from playground.miniature.formatting import dig, label
from playground.miniature.grid import draw_grid
from playground.miniature.markdown import report_markdown
from playground.miniature.runner import Context, Layout, read_json, write_json
from playground.miniature.scoring import summary
from playground.pointer import write_pointer
from scout_data.output import atomic_write_text

PLAYGROUND_EXAMPLES = 8


def write_report(ctx: Context) -> dict[str, Any]:
    """``report.md``, ``grid.png``, ``results.json`` and ``playground.json`` in ``--out``."""
    recipe, layout = ctx.recipe, ctx.layout
    out = layout.out
    metrics = read_json(layout.eval / "metrics.json")
    models: dict[str, dict[str, Any]] = metrics["models"]
    evaluated = {m.name: m for m in evaluated_models(recipe, layout)}
    names = list(evaluated)
    stamps = {n: ctx.stamps.get(m.stage, {}) for n, m in evaluated.items()}
    best = best_twist(names, models)
    checks = {n: twist_checks(recipe, n, models) for n in names if n.startswith("twist")}
    order = [name for name in ctx.stamps if name != ctx.stage]  # the stages before this one, in run order
    qcount = metrics["questions"]

    rows = draw_grid(layout, names, models, recipe.eval.grid_scenes, recipe.eval.grid_cell_px, out / "grid.png")
    examples = playground_examples(layout, best, models[best], out / "examples", PLAYGROUND_EXAMPLES)
    pointer = write_pointer(out, evaluated[best].folder, evaluated["base"].folder,
                            f"the demo's {label(best)} on its tiny LLaVA-1.5 base ({recipe.profile} profile)",
                            examples["folder"])
    atomic_write_text(str(out / "report.md"), report_markdown(ctx, names, models, qcount, best, checks, examples, rows))

    results = {
        "profile": recipe.profile,
        "recipe": recipe.to_json(),
        "questions": qcount,
        "models": {n: {**{k: v for k, v in models[n].items() if k != "refexp"},
                       "refexp": {p: {s: summary(r) for s, r in sets.items()}
                                  for p, sets in models[n]["refexp"].items()},
                       "headline": summary(models[n]["headline"]),
                       "understanding": summary(models[n]["understanding"]),
                       "path": os.path.relpath(evaluated[n].folder, out),
                       "trainable_params": dig(stamps[n], "info", "trainable_params"),
                       "train": {k: dig(stamps[n], "info", k) for k in ("steps", "first_loss", "last_loss")}}
                   for n in names},
        "best_twist": best,
        "checks": [c.to_json() for cs in checks.values() for c in cs],
        "stages": {n: {"seconds": ctx.stamps[n].get("seconds"), "finished": ctx.stamps[n].get("finished")}
                   for n in order if n in ctx.stamps},
        "playground": {**pointer, "correct": examples["correct"], "n": examples["n"]},
    }
    write_json(out / "results.json", results)
    return {"best_twist": best, "grid_rows": rows,
            "checks_passed": sum(bool(c.passed) for cs in checks.values() for c in cs)}


EXAMPLE_PROMPT = "scout"  # the playground streams a chain's steps and draws each step's boxes


def playground_examples(layout: Layout, model: str, metrics: dict[str, Any], out: Path, n: int) -> dict[str, Any]:
    """The first ``n`` test expressions (not picked by outcome), asked step by step, as the playground's examples;
    with how many of them the model's step-by-step answers got right in the evaluation."""
    style = PROMPTS[EXAMPLE_PROMPT]
    correct = metrics["refexp"][EXAMPLE_PROMPT][HEADLINE_SET]["correct"]
    questions = {q["question_id"]: q for q in
                 read_jsonl(str(question_dir(layout) / f"refexp-{HEADLINE_SET}.jsonl"), "questions")}
    records = [r for r in heldout_records(layout, HEADLINE_SET) if f"{HEADLINE_SET}/{r['id']}" in correct][:n]
    ids = [f"{HEADLINE_SET}/{r['id']}" for r in records]
    write_record_examples(records, heldout_folder(layout, HEADLINE_SET) / "images", out,
                          queries=[question_prompt(questions[i], style) for i in ids])
    return {"folder": out, "n": len(records), "correct": sum(correct[i] for i in ids), "prompt": EXAMPLE_PROMPT}

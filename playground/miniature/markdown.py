"""``report.md``: the tables and sections of the demo's report, from ``metrics.json``, the recipe and the stamps."""

from __future__ import annotations

import math
import os
from typing import Any

from llava_twist.eval.answer_loss import MASS_KINDS
from llava_twist.eval.paired import format_p
from llava_twist.tiny import COORDINATES
from playground.miniature.answering import question_dir, twist_names
from playground.miniature.checks import Check
from playground.miniature.formatting import dig, label, num, pct
from playground.miniature.recipe import Recipe, Warmup
from playground.miniature.runner import Context
from scout_data.sources.synthetic.config import KINDS, parse_weights
from scout_data.writer import REGION_PROMPT

PROMPT_LABELS = {"rec": "REC prompt", "scout": "step-by-step prompt"}
REC_SHOWN = REGION_PROMPT.removesuffix(".").format(query="...")


def where(recipe: Recipe) -> str:
    return "one GPU in bf16" if recipe.device == "cuda" else "CPU in fp32"


def paired_cell(result: dict[str, Any] | None) -> str:
    """``+7.7 (+4.6..+11.0), p 2e-06``."""
    if not result:
        return "–"
    low, high = (100 * v for v in result["ci"])
    return f"{100 * result['difference']:+.1f} ({low:+.1f}..{high:+.1f}), p {format_p(result['mcnemar_p'])}"


def grounding_table(names: list[str], models: dict[str, dict[str, Any]], types: list[str]) -> str:
    """Test-split Acc@0.5 per model: under its dev-chosen prompt, under each prompt, by expression type, and the
    paired difference from the base."""
    head = ["model", "prompt (chosen on dev)", "Acc@0.5", "REC prompt", "step-by-step prompt", *types,
            "vs base: points (95% CI), McNemar p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        m = models[n]
        by_type = dig(m, "headline", "by_type") or {}
        lines.append("| " + " | ".join([
            label(n), PROMPT_LABELS[m["prompt"]], f"**{pct(dig(m, 'headline', 'acc@0.5'))}**",
            *(pct(dig(m, "refexp", p, "test", "acc@0.5")) for p in PROMPT_LABELS),
            *(pct(dig(by_type, t, "acc@0.5")) for t in types),
            "(reference)" if n == "base" else paired_cell(m.get("vs_base")),
        ]) + " |")
    return "\n".join(lines)


def understanding_table(names: list[str], models: dict[str, dict[str, Any]]) -> str:
    """Held-out understanding per model: accuracy, answers identical to the base's, the paired difference from the
    base (the forgetting TWIST avoids) and, for TWIST, the router."""
    head = ["model", "accuracy", "identical to base", "vs base: points (95% CI), McNemar p", "router right"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        m = models[n]
        lines.append("| " + " | ".join([
            label(n), pct(dig(m, "understanding", "accuracy")),
            "(reference)" if n == "base" else pct(dig(m, "retention", "identical_rate")),
            "(reference)" if n == "base" else paired_cell(dig(m, "retention", "vs_base")),
            pct(dig(m, "router", "accuracy")) if "router" in m else "–",
        ]) + " |")
    return "\n".join(lines)


def understanding_by_type_table(names: list[str], models: dict[str, Any]) -> str:
    """Understanding accuracy per question type (colour, shape, count, exists, relation, ...), one row a model."""
    types = sorted({t for n in names for t in (dig(models[n], "understanding", "by_type") or {})})
    if not types:
        return "Understanding by question type: the questions carry no type."
    rows = ["Understanding by question type (held-out):", "", "| model | " + " | ".join(types) + " |",
            "|---|" + "---|" * len(types)]
    for n in names:
        by_type = dig(models[n], "understanding", "by_type") or {}
        cells = [f"{pct(by_type[t]['accuracy'])} ({by_type[t]['n']})" if t in by_type else "–" for t in types]
        rows.append(f"| {label(n)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def chain_loss_section(recipe: Recipe, names: list[str], models: dict[str, dict[str, Any]]) -> list[str]:
    """Each model's teacher-forced loss on the held-out chains, per text token and per box coordinate, the first
    corner apart: a model can write a chain's words, and a box's second corner from its first and the object's
    size, and still not know where anything is."""
    losses = {n: models[n].get("chain_loss") for n in names}
    if not any(losses.values()):
        return []

    def mean(r: dict[str, Any] | None, *kinds: str) -> str:
        per = r["loss_per_token"] if r else {}
        values = [(per.get(k), r["tokens"].get(k, 0)) for k in kinds] if r else []
        n = sum(c for v, c in values if v is not None)
        return num(sum(v * c for v, c in values if v is not None) / n) if n else "–"

    def mass(r: dict[str, Any] | None) -> str:
        corner = dig(r, "coordinate_mass", "first_corner")
        return " / ".join(f"{corner[k]:.2f}" for k in MASS_KINDS[:3]) if corner else "–"

    first = next(r for r in losses.values() if r)
    near = dig(first, "coordinate_mass", "near_hundredths")
    lines = ["| model | per coordinate | first corner (x1, y1) | second corner (x2, y2) | per text token |"
             + (f" first corner's probability: its value / within {near / 100:.2f} / farther |"
                if near else ""),
             "|---|---|---|---|---|" + ("---|" if near else "")]
    lines += [f"| {label(n)} | {mean(r, 'coordinate')} | {mean(r, 'x1', 'y1')} | {mean(r, 'x2', 'y2')} | "
              f"{mean(r, 'text')} |" + (f" {mass(r)} |" if near else "") for n, r in losses.items()]
    ref = ""
    if recipe.model.coordinate_tokens:
        ref = (f" A guess spread evenly over the {len(COORDINATES)} coordinate tokens costs "
               f"{math.log(len(COORDINATES)):.2f} nats per coordinate; a model that localises is far below it on "
               "the first corner too.")
    if near:
        ref += (f" Where the first corner's probability goes tells what a coordinate-aware loss (soft targets over "
                f"neighbouring coordinates) could change: it rewards only the mass within {near} hundredths.")
    return ["## Where the loss sits", "",
            f"Teacher-forced loss (nats per token) on {first['records']} held-out chains "
            f"({first['tokens']['coordinate']} box-coordinate tokens, {first['tokens']['text']} others; "
            f"`llava_twist.eval.answer_loss`).{ref}", "", *lines, ""]


def prompts_by_type_table(names: list[str], models: dict[str, dict[str, Any]], types: list[str]) -> list[str]:
    """Test-split Acc@0.5 of every model under both prompts, by expression type, and each model's step-by-step
    answers against its own one-shot ones (paired within each type): whether the steps pay."""
    head = ["model", "prompt", "all", *types]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        for p, shown in PROMPT_LABELS.items():
            test = dig(models[n], "refexp", p, "test") or {}
            lines.append("| " + " | ".join([label(n), shown, pct(test.get("acc@0.5")),
                                            *(pct(dig(test, "by_type", t, "acc@0.5")) for t in types)]) + " |")
        paired = models[n].get("steps_vs_one_shot")
        if paired:
            lines.append("| " + " | ".join([label(n), "step-by-step - REC", paired_cell(paired.get("all")),
                                            *(paired_cell(paired.get(t)) for t in types)]) + " |")
    return ["## Both prompts, by expression type", "",
            "Test-split Acc@0.5 under each prompt; \"step-by-step - REC\": the model's step-by-step answers against "
            "its own one-shot answers on the same expressions (points, 95% bootstrap interval, exact McNemar p), "
            "overall and within each type.", "", *lines, ""]


def misses_section(names: list[str], models: dict[str, dict[str, Any]]) -> list[str]:
    """Every model's step-by-step answers on the test split read step by step (``playground.miniature.chain_misses``):
    where the answer lands, step accuracy by role (anchor, candidates, the deciding step) and consistency."""
    rows = [(label(n), dig(models[n], "misses", "scout", "all")) for n in names]
    rows = [(name, m) for name, m in rows if m and m["n"]]
    if not rows:
        return []

    def share(s: dict[str, Any] | None) -> str:
        return f"{pct(s['rate'])} ({s['k']}/{s['n']})" if s and s["n"] else "–"

    head = ["model", "answer right", "on another object", "on no object", "step accuracy", "anchor", "candidates",
            "deciding step", "consistency", "anchor found", "target among steps", "step boxes on an object"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows:
        cells = [m["answer"]["right"], m["answer"]["on_another_object"], m["answer"]["on_no_object"],
                 m["step_accuracy"], *(m["by_role"][r] for r in ("anchor", "candidates", "decide")),
                 m["consistency"], m["anchor_found"], m["target_among_steps"], m["step_boxes_on_an_object"]]
        lines.append(f"| {name} | " + " | ".join(share(c) for c in cells) + " |")
    return ["## Step diagnostics (step-by-step prompt, test split)", "",
            f"Each model's {rows[0][1]['n']} step-by-step answers, each step read by its role: the *anchor* (a "
            "relation's reference object: its box on the anchor), the *candidates* (a phrase of the expression: its "
            "boxes on exactly the objects its words name), the *deciding step* (\"the one it asks for: [...]\": "
            "its box on the target). *Consistency*: the answer's box is the box of the last step (the one that "
            "decided). A box is on an object at IoU >= 0.5 (`playground.miniature.chain_misses`).", "", *lines, ""]


def vision_line(stamp: dict[str, Any] | None) -> str:
    """What the pretrained tower reads out of a held-out scene's patches (the stand-in for CLIP's knowledge), from
    the model stage's stamp or, for a released base, from its card."""
    v = dig(stamp or {}, "info", "vision_pretraining")
    if not v:
        return "Vision tower: randomly initialised (no pretraining in this recipe)."
    h = v["held_out"]
    return (f"Vision tower (frozen in every run, as LLaVA's CLIP): after {v['seconds']:.0f} s of dense pretraining, "
            f"linear read-outs of the patch features LLaVA feeds its projector get a held-out scene's patches right "
            f"at shape {pct(h['shape_acc'])}, colour {pct(h['colour_acc'])}, size {pct(h['size_acc'])}, "
            f"row {pct(h['row_acc'])}, column {pct(h['col_acc'])}, and the object's box within "
            f"{h['box_l1_px']:.1f} px (mean L1).")


def settings_table(recipe: Recipe) -> str:
    rows = [
        ("tiny model", ", ".join(f"{k}={v}" for k, v in vars(recipe.model).items())),
        ("vision tower", _vision(recipe)),
        ("base data", _scene(recipe.base_data)),
        ("grounding data", _scene(recipe.grounding_data) + f"; replay ratio {recipe.replay_ratio:g}"),
        *((f"held-out {name}", _scene(spec)) for name, spec in recipe.heldout.sets().items()),
        *((f"base warm-up: {w.name}", _warmup(w)) for w in recipe.warmups),
        ("base", _train(recipe.base) + (", from the warmed-up model" if recipe.warmups else ", from the tiny model")),
        ("full FT", _train(recipe.full_ft)),
        ("LoRA", _train(recipe.lora) + f", r={recipe.lora_r}, alpha={recipe.lora_alpha}, "
                                       f"projector lr {recipe.lora_mm_projector_lr:g}"),
        ("TWIST", _train(recipe.twist) + f", {recipe.twist_nproc} processes (ZeRO-3), "
                                         f"flags `{' '.join(recipe.twist_flags)}`"),
        *((label(n), f"`{' '.join(v.flags)}`, training set `{v.data}`")
          for n, v in zip(twist_names(recipe), recipe.twist_variants, strict=True)),
        ("evaluation", f"greedy, max_new_tokens={recipe.eval.max_new_tokens}, batch {recipe.eval.batch_size}; "
                       f"teacher-forced loss on {recipe.eval.limit} test chains"),
        ("seed", f"{recipe.seed} (base and data), {recipe.train_seed} (grounding runs)"),
    ]
    return "\n".join(["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _vision(recipe: Recipe) -> str:
    v = recipe.vision
    if v is None:
        return "random (not pretrained)"
    return (f"dense pretraining on {v.scenes} scenes of the base data's world, {v.steps} steps x batch {v.batch}, "
            f"lr {v.lr:g} (`playground.miniature.vision_pretrain`)")


def _warmup(w: Warmup) -> str:
    d = w.data
    kinds = parse_weights(d.kinds, KINDS, "kind").keys()
    prompts = ", ".join([*([f"questions {d.qa_types}"] if "qa" in kinds else []),
                         *([f"refexp {d.refexp_types}"] if kinds & {"region", "refexp"} else [])])
    return f"{_train(w.train)} on {d.num} records ({d.kinds}; {prompts}), {_objects(d)}, {d.image_size} px"


def _objects(s: Any) -> str:
    if s.min_objects == s.max_objects:
        return f"{s.min_objects} object{'s' if s.min_objects > 1 else ''} per scene"
    return f"{s.min_objects}-{s.max_objects} objects"


def _scene(s: Any) -> str:
    world = "".join(f"; {k} {getattr(s, k)}" for k in ("shapes", "colours", "sizes", "clutter") if getattr(s, k))
    return (f"{s.num} records ({s.kinds}; refexp {s.refexp_types}), {s.image_size} px, "
            f"{_objects(s)}, test fraction {s.test_fraction:g}{world}")


def _train(t: Any) -> str:
    projector = f", projector lr {t.mm_projector_lr:g}" if t.mm_projector_lr is not None else ""
    return f"{t.steps} steps x batch {t.batch}, lr {t.lr:g}{projector} ({t.scheduler})"


def times_table(stamps: dict[str, dict[str, Any]], order: list[str]) -> str:
    lines = ["| stage | time (s) | finished |", "|---|---|---|"]
    total = 0.0
    for name in order:
        s = stamps.get(name)
        if s is None:
            continue
        total += float(s.get("seconds", 0.0))
        lines.append(f"| {name} | {float(s.get('seconds', 0.0)):.1f} | {s.get('finished', '')} |")
    lines.append(f"| total | {total:.1f} | |")
    return "\n".join(lines)


def report_markdown(ctx: Context, names: list[str], models: dict[str, dict[str, Any]], qcount: dict[str, Any],
                    best: str, checks: dict[str, list[Check]], examples: dict[str, Any], rows: int) -> str:
    """The whole ``report.md``: each model's figures, the checks, the grid, the settings and the time per stage."""
    recipe, layout = ctx.recipe, ctx.layout
    out = layout.out
    types = sorted(qcount["test_by_type"])
    order = [name for name in ctx.stamps if name != ctx.stage]  # the stages before this one, in run order
    forgetting = "; ".join(f"{label(n)} {paired_cell(dig(models[n], 'retention', 'vs_base'))}"
                           for n in ("full-ft", "lora") if n in models) or "no baseline in this run"
    by_type_n = ", ".join(f"{t} {qcount['test_by_type'][t]}" for t in types)
    md = [
        f"# TWIST & SCOUT demo ({recipe.profile} profile, training seed {recipe.train_seed})",
        "",
        "A tiny LLaVA-1.5 (the released base), taught grounding on the same records (one-shot referring "
        "expressions in LLaVA-1.5's REC form, SCOUT step-by-step chains, find-all, understanding replay) and the "
        f"same step budget by full fine-tuning, LoRA and TWIST, all on {where(recipe)}. Fresh held-out scenes: "
        f"{qcount['test']} test expressions ({by_type_n}), {qcount['dev']} dev expressions (they choose each "
        f"model's prompt), {qcount['understanding']} understanding questions.",
        "",
        "## Grounding (test split)",
        "",
        grounding_table(names, models, types),
        "",
        f"Acc@0.5 under the prompt each model does better with on dev (REC: LLaVA-1.5's \"{REC_SHOWN}\"; "
        "step-by-step: SCOUT's prompt); both prompts' columns on test; by expression type under the chosen prompt. "
        "vs base: the paired difference on the same expressions, a 95% bootstrap interval over expressions and the "
        "exact McNemar test (`llava_twist.eval.paired`).",
        "",
        "## Understanding (what the models keep)",
        "",
        understanding_table(names, models),
        "",
        f"Forgetting (understanding against the base, paired): {forgetting}. The router's figure is TWIST's route "
        "(auto) on every held-out prompt (referring expressions under both prompts -> grounding, understanding "
        "questions -> frozen).",
        "",
        understanding_by_type_table(names, models),
        "",
        "## What it must show",
        "",
        f"Best TWIST: **{label(best)}** (the playground opens it; its examples are the first {examples['n']} test "
        f"expressions with the {PROMPT_LABELS[examples['prompt']]}: its answers are right on "
        f"**{examples['correct']} of {examples['n']}**).",
        "",
        *(c.line() for cs in checks.values() for c in cs),
        "",
        vision_line(ctx.stamps.get("model") or ctx.stamps.get("base")),
        "",
        *prompts_by_type_table(names, models, types),
        *misses_section(names, models),
        *chain_loss_section(recipe, names, models),
        "## Test scenes",
        "",
        f"![grid](grid.png) ({rows} scenes; the ground-truth box is black in white; under each image, the steps "
        "that model wrote)",
        "",
        "## Files",
        "",
        f"Questions in `{os.path.relpath(question_dir(layout), out)}/` (`refexp-dev.jsonl`, `refexp-test.jsonl`, "
        f"`understanding.jsonl`; images relative to `{os.path.relpath(layout.data, out)}`), each model's answers "
        f"in `{os.path.relpath(layout.eval / 'models', out)}/<model>/<prompt>/answers.jsonl` (LLaVA's answer "
        "JSONL), every score in `results.json`.",
        "",
        "## Settings",
        "",
        settings_table(recipe),
        "",
        "## Time per stage",
        "",
        times_table(ctx.stamps, order),
        "",
        f"Logs: `{os.path.relpath(layout.logs, out)}/<stage>.log`; models: `{os.path.relpath(layout.models, out)}`.",
        "",
    ]
    return "\n".join(md)

"""The demo's deliverables in ``--out``: ``report.md`` (table, checks, settings, time per stage), ``grid.png``
(held-out scenes x models, predicted and ground-truth boxes with the steps), ``results.json`` and
``playground.json`` (the best TWIST variant, for ``make playground``)."""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_twist.demo.evaluation import (
    HEADLINE_SET,
    PROMPTS,
    answers_file,
    evaluated_models,
    heldout_folder,
    heldout_records,
    question_dir,
    summary,
    twist_names,
)
from llava_twist.demo.pipeline import Context, Layout, read_json, write_json
from llava_twist.demo.pointer import write_pointer
from llava_twist.demo.recipe import Recipe, Warmup
from llava_twist.eval.common import read_jsonl
from llava_twist.eval.paired import describe, format_p
from llava_twist.tiny import COORDINATES
from scout_data.output import atomic_write_text
from scout_data.sources.synthetic.config import KINDS, parse_weights
from scout_data.writer import REGION_PROMPT

LABELS = {"base": "base (LLaVA-1.5)", "full-ft": "full FT", "lora": "LoRA", "twist": "TWIST"}
PROMPT_LABELS = {"rec": "REC prompt", "scout": "step-by-step prompt"}
REC_SHOWN = REGION_PROMPT.removesuffix(".").format(query="...")
MAX_CELL_CHARS = 400
PLAYGROUND_EXAMPLES = 8


def label(name: str) -> str:
    return LABELS.get(name) or f"TWIST ({name.removeprefix('twist-')})"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)  # type: ignore[assignment]
    return d


@dataclass
class Check:
    model: str
    what: str
    passed: bool | None  # None: not measurable (e.g. no questions)
    measured: str
    target: str

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]
        return f"- **{mark}** {label(self.model)}: {self.what}: {self.measured} (target: {self.target})"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "check": self.what, "passed": self.passed, "measured": self.measured,
                "target": self.target}


def twist_checks(recipe: Recipe, name: str, models: dict[str, dict[str, Any]]) -> list[Check]:
    """What the demo must show, for one TWIST variant, against the measured numbers (test split, each model's
    prompt chosen on dev)."""
    c = recipe.checks
    m = models[name]
    identical = get(m, "retention", "identical_rate")
    router = get(m, "router", "accuracy")
    vs_base, vs_full = m.get("vs_base"), m.get("vs_full_ft")
    gain = get(vs_base, "difference")
    acc, acc_full = get(m, "headline", "acc@0.5"), get(models, "full-ft", "headline", "acc@0.5")
    ratio = None if acc is None or not acc_full else acc / acc_full
    significant = None if vs_base is None else vs_base["ci"][0] > 0 and vs_base["mcnemar_p"] < c.max_p_value
    return [
        Check(name, "understanding answers identical to the base's",
              None if identical is None else identical >= c.identical_rate, pct(identical), pct(c.identical_rate)),
        Check(name, "router right on held-out prompts", None if router is None else router >= c.router_accuracy,
              f"{pct(router)} (grounding prompts {pct(get(m, 'router', 'by_task', 'grounding', 'accuracy'))}, "
              f"understanding {pct(get(m, 'router', 'by_task', 'understanding', 'accuracy'))})",
              f">= {pct(c.router_accuracy)}"),
        Check(name, "Acc@0.5 gain over the base", None if gain is None else gain >= c.gain_over_base,
              f"{pct(acc)} vs {pct(get(models, 'base', 'headline', 'acc@0.5'))} "
              f"({'–' if gain is None else f'{100 * gain:+.1f}'} points)", f"+{100 * c.gain_over_base:.0f} points"),
        Check(name, "that gain, paired", significant, "–" if vs_base is None else describe(vs_base),
              f"95% interval above 0 and McNemar p < {c.max_p_value:g}"),
        Check(name, "Acc@0.5 relative to full fine-tuning at the same budget",
              None if ratio is None else ratio >= c.ratio_to_full_ft,
              f"{pct(acc)} vs {pct(acc_full)} ({'–' if ratio is None else f'{ratio:.2f}x'}"
              + ("" if vs_full is None else f"; paired {describe(vs_full)}") + ")", f">= {c.ratio_to_full_ft:g}x"),
    ]


def best_twist(names: list[str], models: dict[str, dict[str, Any]]) -> str:
    """The TWIST model with the highest test Acc@0.5 (the first on ties)."""
    twists = [n for n in names if n.startswith("twist")]
    return max(twists, key=lambda n: (get(models[n], "headline", "acc@0.5") or 0.0, -twists.index(n)))


def understanding_by_type_table(names: list[str], models: dict[str, Any]) -> str:
    """Understanding accuracy per question type (colour, shape, count, exists, relation, ...), one row a model."""
    types = sorted({t for n in names for t in (get(models[n], "understanding", "by_type") or {})})
    if not types:
        return "Understanding by question type: the questions carry no type."
    rows = ["Understanding by question type (held-out):", "", "| model | " + " | ".join(types) + " |",
            "|---|" + "---|" * len(types)]
    for n in names:
        by_type = get(models[n], "understanding", "by_type") or {}
        cells = [f"{pct(by_type[t]['accuracy'])} ({by_type[t]['n']})" if t in by_type else "–" for t in types]
        rows.append(f"| {label(n)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


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
        by_type = get(m, "headline", "by_type") or {}
        lines.append("| " + " | ".join([
            label(n), PROMPT_LABELS[m["prompt"]], f"**{pct(get(m, 'headline', 'acc@0.5'))}**",
            *(pct(get(m, "refexp", p, "test", "acc@0.5")) for p in PROMPT_LABELS),
            *(pct(get(by_type, t, "acc@0.5")) for t in types),
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
            label(n), pct(get(m, "understanding", "accuracy")),
            "(reference)" if n == "base" else pct(get(m, "retention", "identical_rate")),
            "(reference)" if n == "base" else paired_cell(get(m, "retention", "vs_base")),
            pct(get(m, "router", "accuracy")) if "router" in m else "–",
        ]) + " |")
    return "\n".join(lines)


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

    from llava_twist.eval.answer_loss import MASS_KINDS

    def mass(r: dict[str, Any] | None) -> str:
        corner = get(r, "coordinate_mass", "first_corner")
        return " / ".join(f"{corner[k]:.2f}" for k in MASS_KINDS[:3]) if corner else "–"

    first = next(r for r in losses.values() if r)
    near = get(first, "coordinate_mass", "near_hundredths")
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


def misses_section(names: list[str], models: dict[str, dict[str, Any]]) -> list[str]:
    """Where each model's answer boxes land among its scene's objects, and whether its steps' boxes land on the
    objects the steps name (``llava_twist.demo.chain_misses``): choosing wrong among found objects, or not
    finding them."""
    rows = [(f"{label(n)}, {PROMPT_LABELS[models[n]['prompt']]}", models[n].get("misses")) for n in names]
    rows = [(name, m) for name, m in rows if m and m["n"]]
    if not rows:
        return []

    def share(count: int, total: int) -> str:
        return f"{count} ({pct(count / total)})" if total else "–"

    lines = ["| model | answer right | on another object | on no object | step boxes | on an object | "
             "on the object the step names |", "|---|---|---|---|---|---|---|"]
    for name, m in rows:
        a, s = m["answer"], m["steps"]
        lines.append(f"| {name} | {share(a['right'], m['n'])} | {share(a['another_object'], m['n'])} | "
                     f"{share(a['no_object'], m['n'])} | {s['boxes']} | {share(s['on_an_object'], s['boxes'])} | "
                     f"{share(s['on_the_named_object'], s['boxes'])} |")
    return ["## How the chains miss", "",
            f"Each first answer box of the {rows[0][1]['n']} test expressions against every object of "
            "its scene (IoU >= 0.5; an answer without a box counts as on no object), and the box of each step that "
            "has one against the object the step's words name (every attribute it names is the object's).", "",
            *lines, ""]


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
            f"lr {v.lr:g} (`llava_twist.demo.vision_pretrain`)")


def _warmup(w: Warmup) -> str:
    d = w.data
    kinds = parse_weights(d.kinds, KINDS, "kind").keys()
    prompts = ", ".join([*([f"questions {d.qa_types}"] if "qa" in kinds else []),
                         *([f"refexp {d.refexp_types}"] if kinds & {"region", "refexp"} else [])])
    return f"{_train(w.train)} on {d.num} records ({d.kinds}; {prompts}), {_objects(d)}, {d.image_size} px"


def vision_line(stamp: dict[str, Any] | None) -> str:
    """What the pretrained tower reads out of a held-out scene's patches (the stand-in for CLIP's knowledge), from
    the model stage's stamp or, for a released base, from its card."""
    v = get(stamp or {}, "info", "vision_pretraining")
    if not v:
        return "Vision tower: randomly initialised (no pretraining in this recipe)."
    h = v["held_out"]
    return (f"Vision tower (frozen in every run, as LLaVA's CLIP): after {v['seconds']:.0f} s of dense pretraining, "
            f"linear read-outs of the patch features LLaVA feeds its projector get a held-out scene's patches right "
            f"at shape {pct(h['shape_acc'])}, colour {pct(h['colour_acc'])}, size {pct(h['size_acc'])}, "
            f"row {pct(h['row_acc'])}, column {pct(h['col_acc'])}, and the object's box within "
            f"{h['box_l1_px']:.1f} px (mean L1).")


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


# ---------------------------------------------------------------- grid


def grid_questions(questions: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` held-out refexp questions, simple and hard in turn."""
    simple = [q for q in questions if q.get("difficulty") == "simple"]
    hard = [q for q in questions if q.get("difficulty") != "simple"]
    picked: list[dict[str, Any]] = []
    while len(picked) < n and (simple or hard):
        for pool in (simple, hard):
            if pool and len(picked) < n:
                picked.append(pool.pop(0))
    return picked


def cell_image(image: Any, text: str, gt_box_px: list[float] | None, size: int, frame: str) -> Any:
    """The image scaled to ``size`` px wide, the ground-truth box (black inside white), the chain's boxes and
    steps (``scout_data.preview.draw_chain``) on it."""
    from PIL import Image, ImageDraw

    from scout_data.preview import draw_chain

    w, h = image.size
    scale = size / w
    big = image.convert("RGB").resize((size, max(1, round(h * scale))), Image.NEAREST)
    if gt_box_px is not None:
        x1, y1, x2, y2 = (v * scale for v in gt_box_px)
        draw = ImageDraw.Draw(big)
        draw.rectangle([x1 - 2, y1 - 2, max(x1, x2 - 1) + 2, max(y1, y2 - 1) + 2], outline=(255, 255, 255), width=2)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=(0, 0, 0), width=1)
    return draw_chain(big, text[:MAX_CELL_CHARS], frame)


def draw_grid(layout: Layout, names: list[str], metrics: dict[str, Any], scenes: int, size: int, out: Path) -> int:
    """Rows: test scenes; columns: ground truth, then each model under its chosen prompt. Returns the number of
    rows drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from llava_twist.eval.common import answers_by_id, read_jsonl

    questions = read_jsonl(str(question_dir(layout) / f"refexp-{HEADLINE_SET}.jsonl"), "questions")
    picked = grid_questions(questions, scenes)
    records = {f"{HEADLINE_SET}/{r['id']}": r for r in heldout_records(layout, HEADLINE_SET)}
    answers = {n: answers_by_id(read_jsonl(str(answers_file(layout, n, metrics[n]["prompt"])), "answers"))
               for n in names}
    grid: list[list[tuple[str, Any]]] = []
    for q in picked:
        with Image.open(layout.data / q["image"]) as im:
            image = im.convert("RGB")
        rec = records.get(q["question_id"], {})
        gt_text = (rec.get("conversations") or [{}, {}])[1].get("value", "")
        frame = q.get("box_frame", "padded")
        gt_title = f"ground truth ({q.get('difficulty', '?')})\n" + "\n".join(textwrap.wrap(q["text"], 32))
        row = [(gt_title, cell_image(image, gt_text, q.get("bbox_xyxy_px"), size, frame))]
        for n in names:
            text = str(answers[n].get(q["question_id"], {}).get("text", ""))
            right = get(metrics, n, "headline", "correct", q["question_id"])
            verdict = "" if right is None else f"\n{'right' if right else 'wrong'}"
            title = f"{label(n)}, {metrics[n]['prompt']}{verdict}"
            row.append((title, cell_image(image, text, q.get("bbox_xyxy_px"), size, frame)))
        grid.append(row)
    height = max((cell.size[1] for row in grid for _, cell in row), default=size)
    rows, cols = max(1, len(grid)), 1 + len(names)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows * height / size + 0.6 * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(grid):
        for c, (title, cell) in enumerate(row):
            padded = Image.new("RGB", (size, height), (255, 255, 255))
            padded.paste(cell, (0, 0))
            axes[r][c].imshow(padded)
            axes[r][c].set_title(title, fontsize=7)
    if not picked:
        axes[0][0].text(0.5, 0.5, "no held-out refexp questions", ha="center", va="center")
    fig.suptitle("Held-out scenes: each model's boxes and steps; ground truth boxed black in white", fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return len(picked)


# ---------------------------------------------------------------- report


def where(recipe: Recipe) -> str:
    return "one GPU in bf16" if recipe.device == "cuda" else "CPU in fp32"


def playground_examples(layout: Layout, model: str, metrics: dict[str, Any], out: Path, n: int) -> dict[str, Any]:
    """The first ``n`` test expressions (not picked by outcome), asked with ``model``'s chosen prompt, as the
    playground's examples; with how many of them the model got right in the evaluation."""
    from llava_twist.eval.prompts import question_prompt
    from playground.make_examples import write_record_examples

    style = PROMPTS[metrics["prompt"]]
    correct = metrics["headline"]["correct"]
    questions = {q["question_id"]: q for q in
                 read_jsonl(str(question_dir(layout) / f"refexp-{HEADLINE_SET}.jsonl"), "questions")}
    records = [r for r in heldout_records(layout, HEADLINE_SET) if f"{HEADLINE_SET}/{r['id']}" in correct][:n]
    ids = [f"{HEADLINE_SET}/{r['id']}" for r in records]
    write_record_examples(records, heldout_folder(layout, HEADLINE_SET) / "images", out,
                          queries=[question_prompt(questions[i], style) for i in ids])
    return {"folder": out, "n": len(records), "correct": sum(correct[i] for i in ids), "prompt": metrics["prompt"]}


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
    types = sorted(qcount["test_by_type"])

    rows = draw_grid(layout, names, models, recipe.eval.grid_scenes, recipe.eval.grid_cell_px, out / "grid.png")
    examples = playground_examples(layout, best, models[best], out / "examples", PLAYGROUND_EXAMPLES)
    pointer = write_pointer(out, evaluated[best].folder, evaluated["base"].folder,
                            f"the demo's {label(best)} on its tiny LLaVA-1.5 base ({recipe.profile} profile)",
                            examples["folder"])
    forgetting = "; ".join(f"{label(n)} {paired_cell(get(models[n], 'retention', 'vs_base'))}"
                           for n in ("full-ft", "lora"))
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
        f"expressions with its {PROMPT_LABELS[examples['prompt']]}, of which it got {examples['correct']} right).",
        "",
        *(c.line() for cs in checks.values() for c in cs),
        "",
        vision_line(ctx.stamps.get("model") or ctx.stamps.get("base")),
        "",
        *chain_loss_section(recipe, names, models),
        *misses_section(names, models),
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
    atomic_write_text(str(out / "report.md"), "\n".join(md))

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
                       "trainable_params": get(stamps[n], "info", "trainable_params"),
                       "train": {k: get(stamps[n], "info", k) for k in ("steps", "first_loss", "last_loss")}}
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


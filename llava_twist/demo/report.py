"""The demo's deliverables in ``--out``: ``report.md`` (table, checks, settings, time per stage), ``grid.png``
(held-out scenes x models, predicted and ground-truth boxes with the steps), ``results.json`` and
``playground.json`` (the best TWIST variant, for ``make playground``)."""

from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_twist.demo.pipeline import GROUNDING_PREFIX, Context, Layout, read_json, write_json
from llava_twist.demo.pointer import write_pointer
from llava_twist.demo.recipe import Recipe, Warmup
from llava_twist.tiny import COORDINATES
from scout_data.output import atomic_write_text
from scout_data.sources.synthetic import KINDS, parse_weights
from scout_data.writer import REGION_PROMPT

LABELS = {"base": "base (LLaVA-1.5)", "full-ft": "full FT", "lora": "LoRA"}
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
    """Issue 7's "what it must show", for one TWIST variant, against the measured numbers."""
    c = recipe.checks
    m, full = models[name], models["full-ft"]
    identical = get(m, "retention", "identical_rate")
    router = get(m, "router", "accuracy")
    acc, acc_full = (get(x, "refexp", "acc@0.5") for x in (m, full))
    acc_base = base_refexp_acc(models)
    gain = None if acc is None or acc_base is None else acc - acc_base
    ratio = None if acc is None or not acc_full else acc / acc_full
    return [
        Check(name, "answers to held-out understanding questions identical to the base's",
              None if identical is None else identical >= c.identical_rate, pct(identical), pct(c.identical_rate)),
        Check(name, "router right on held-out prompts", None if router is None else router >= c.router_accuracy,
              f"{pct(router)} (grounding prompts {pct(get(m, 'router', 'by_task', 'grounding', 'accuracy'))}, "
              f"understanding {pct(get(m, 'router', 'by_task', 'understanding', 'accuracy'))})",
              f">= {pct(c.router_accuracy)}"),
        Check(name, "refexp Acc@0.5 above the base's (the better of its step-by-step and one-shot prompts)",
              None if gain is None else gain >= c.gain_over_base,
              f"{pct(acc)} vs {pct(acc_base)} ({'–' if gain is None else f'{100 * gain:+.1f}'} points)",
              f"+{100 * c.gain_over_base:.0f} points or more"),
        Check(name, "refexp Acc@0.5 relative to full fine-tuning at the same budget",
              None if acc is None or not acc_full else acc >= c.ratio_to_full_ft * acc_full,
              f"{pct(acc)} vs {pct(acc_full)} ({'–' if ratio is None else f'{ratio:.2f}x'})",
              f">= {c.ratio_to_full_ft:g}x"),
    ]


def base_refexp_acc(models: dict[str, dict[str, Any]]) -> float | None:
    """The base's refexp Acc@0.5 under the better of SCOUT's step-by-step prompt and LLaVA's one-shot REC prompt."""
    found = [v for v in (get(models["base"], "refexp", "acc@0.5"), get(models["base"], "one_shot", "acc@0.5"))
             if v is not None]
    return max(found) if found else None


def best_twist(recipe: Recipe, models: dict[str, dict[str, Any]]) -> str:
    """The TWIST variant with the highest refexp Acc@0.5 (the first in the recipe on ties)."""
    names = [v.stage for v in recipe.twist_variants]
    return max(names, key=lambda n: (get(models[n], "refexp", "acc@0.5") or 0.0, -names.index(n)))


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


def results_table(names: list[str], models: dict[str, dict[str, Any]], stamps: dict[str, dict[str, Any]]) -> str:
    head = ["model", "Acc@0.5", "simple", "hard", "mean IoU", "find-all recall@0.5", "understanding acc",
            "identical to base", "router acc", "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        m = models[name]
        ref = m.get("refexp") or {}
        params = get(stamps.get(name, {}), "info", "trainable_params")
        if name == "base" and m.get("one_shot"):
            one = m["one_shot"]
            cells = [f"{label(name)}, one-shot prompt", pct(one.get("acc@0.5")),
                     *(f"{pct(get(one, lv, 'acc@0.5'))} (n={get(one, lv, 'n') or 0})" for lv in ("simple", "hard")),
                     num(one.get("mean_iou"))]
            lines.append("| " + " | ".join(cells + ["–"] * (len(head) - len(cells))) + " |")
        row = [
            label(name) + (", step-by-step prompt" if name == "base" and m.get("one_shot") else ""),
            pct(ref.get("acc@0.5")),
            f"{pct(get(ref, 'simple', 'acc@0.5'))} (n={get(ref, 'simple', 'n') or 0})",
            f"{pct(get(ref, 'hard', 'acc@0.5'))} (n={get(ref, 'hard', 'n') or 0})",
            num(ref.get("mean_iou")),
            pct(get(m, "localization", "recall@0.5")),
            pct(get(m, "understanding", "accuracy")),
            "(reference)" if name == "base" else pct(get(m, "retention", "identical_rate")),
            pct(get(m, "router", "accuracy")) if "router" in m else "–",
            "–" if params is None else f"{params:,}",
        ]
        lines.append("| " + " | ".join(row) + " |")
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
    rows = [(label(n) + (", step-by-step prompt" if n == "base" else ""), models[n].get("misses")) for n in names]
    rows.insert(1, ("base, one-shot REC prompt", get(models.get("base", {}), "one_shot", "misses")))
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
            f"Each first answer box of the {rows[0][1]['n']} held-out referring expressions against every object of "
            "its scene (IoU >= 0.5; an answer without a box counts as on no object), and the box of each step that "
            "has one against the object the step's words name (every attribute it names is the object's).", "",
            *lines, ""]


def settings_table(recipe: Recipe) -> str:
    rows = [
        ("tiny model", ", ".join(f"{k}={v}" for k, v in vars(recipe.model).items())),
        ("vision tower", _vision(recipe)),
        ("base data", _scene(recipe.base_data)),
        ("grounding data", _scene(recipe.grounding_data) + f"; replay ratio {recipe.replay_ratio:g}"),
        *((f"base warm-up: {w.name}", _warmup(w)) for w in recipe.warmups),
        ("base", _train(recipe.base) + (", from the warmed-up model" if recipe.warmups else ", from the tiny model")),
        ("full FT", _train(recipe.full_ft)),
        ("LoRA", _train(recipe.lora) + f", r={recipe.lora_r}, alpha={recipe.lora_alpha}, "
                                       f"projector lr {recipe.lora_mm_projector_lr:g}"),
        ("TWIST", _train(recipe.twist) + f", {recipe.twist_nproc} processes (ZeRO-3), "
                                         f"flags `{' '.join(recipe.twist_flags)}`"),
        *((label(v.stage), f"`{' '.join(v.flags)}`") for v in recipe.twist_variants),
        ("evaluation", f"up to {recipe.eval.limit} held-out questions per benchmark, greedy, "
                       f"max_new_tokens={recipe.eval.max_new_tokens}"),
        ("seed", str(recipe.seed)),
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
    """Rows: held-out scenes; columns: ground truth, then each model. Returns the number of rows drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from llava_twist.eval.common import answers_by_id, read_jsonl

    questions = read_jsonl(str(layout.eval / "questions" / "refexp.jsonl"), "questions")
    picked = grid_questions(questions, scenes)
    records = {}
    test = layout.data / "grounding" / "test.json"
    if test.is_file():
        records = {str(r["id"]): r for r in json.loads(test.read_text(encoding="utf-8"))}
    answers = {n: answers_by_id(read_jsonl(str(layout.eval / "models" / n / "answers.jsonl"), "answers"))
               for n in names}
    grid: list[list[tuple[str, Any]]] = []
    for q in picked:
        with Image.open(layout.data / q["image"]) as im:
            image = im.convert("RGB")
        rec = records.get(q["question_id"].split("/", 1)[-1], {})
        gt_text = (rec.get("conversations") or [{}, {}])[1].get("value", "")
        frame = q.get("box_frame", "padded")
        gt_title = f"ground truth ({q.get('difficulty', '?')})\n" + "\n".join(textwrap.wrap(q["text"], 32))
        row = [(gt_title, cell_image(image, gt_text, q.get("bbox_xyxy_px"), size, frame))]
        for n in names:
            text = str(answers[n].get(q["question_id"], {}).get("text", ""))
            pred = get(metrics, n, "refexp", "predictions", q["question_id"])
            title = label(n) + ("" if pred is None else f"\nIoU {pred['iou']:.2f}")
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


def image_reliance_line(r: dict[str, Any] | None) -> str:
    """Whether the base looks at the image: without that, no model can learn to localise on top of it."""
    if not r:
        return "Does the base use the image? Not measured."
    own, shuffled = r["loss_own_images"], r["loss_shuffled_images"]
    verdict = ("it does not look at the image yet, so no model built on it can localise; a longer base "
               "training is needed" if shuffled - own < 0.01 * max(own, 1e-6) else "it uses the image")
    return (f"Does the base use the image? Its loss on {r['records']} of its training records is {own:.4f} with "
            f"their own images and {shuffled:.4f} with the images shuffled among them: {verdict}.")


def base_region_line(r: dict[str, Any] | None) -> str:
    """Whether the base grounds a little on its own prompt format, as LLaVA-1.5 does on RefCOCO."""
    if not r:
        return "Does the base ground? Not measured (no held-out one-shot box prompts in its data)."
    prompt = REGION_PROMPT.removesuffix(".").format(query="...")
    return (f"Does the base ground? On {r['n']} held-out one-shot box prompts of its own data (\"{prompt}\") its "
            f"Acc@0.5 is {pct(r['acc@0.5'])} (simple {pct(get(r, 'simple', 'acc@0.5'))}, hard "
            f"{pct(get(r, 'hard', 'acc@0.5'))}; mean IoU {r['mean_iou']:.3f}, unparseable answers "
            f"{pct(r['parse_failure_rate'])}). The results table's one-shot row asks the same prompt about the "
            "grounding runs' held-out referring expressions.")


def playground_examples(layout: Layout, predictions: dict[str, dict[str, Any]], out: Path, n: int
                        ) -> dict[str, Any]:
    """The first ``n`` held-out referring expressions (not picked by outcome) as the playground's examples, scenes
    of the model's own world; with how many of them the model got right in the evaluation."""
    from playground.make_examples import write_record_examples

    records = [r for r in read_json(layout.data / "grounding" / "test.json")
               if GROUNDING_PREFIX + str(r["id"]) in predictions][:n]
    write_record_examples(records, layout.data / "grounding" / "images", out)
    right = sum(bool(predictions[GROUNDING_PREFIX + str(r["id"])]["correct"]) for r in records)
    return {"folder": out, "n": len(records), "correct": right}


def model_dirs(recipe: Recipe, layout: Layout) -> dict[str, Path]:
    """Evaluated models in report order: base, full FT, LoRA (merged), each TWIST variant (a delta)."""
    dirs = {"base": layout.model("base"), "full-ft": layout.model("full-ft"),
            "lora": layout.model("lora") / "merged"}
    dirs.update({v.stage: layout.model(v.stage) for v in recipe.twist_variants})
    return dirs


def write_report(ctx: Context) -> dict[str, Any]:
    """``report.md``, ``grid.png``, ``results.json`` and ``playground.json`` in ``--out``."""
    recipe, layout = ctx.recipe, ctx.layout
    out = layout.out
    metrics = read_json(layout.eval / "metrics.json")
    models: dict[str, dict[str, Any]] = metrics["models"]
    dirs = model_dirs(recipe, layout)
    names = list(dirs)
    stamps = ctx.stamps
    best = best_twist(recipe, models)
    checks = {v.stage: twist_checks(recipe, v.stage, models) for v in recipe.twist_variants}
    order = [name for name in stamps if name != ctx.stage]  # the stages before this one, in run order

    rows = draw_grid(layout, names, models, recipe.eval.grid_scenes, recipe.eval.grid_cell_px, out / "grid.png")

    examples = playground_examples(layout, get(models[best], "refexp", "predictions") or {}, out / "examples",
                                   PLAYGROUND_EXAMPLES)
    pointer = write_pointer(out, dirs[best], dirs["base"],
                            f"the demo's {label(best)} on its tiny LLaVA-1.5 base ({recipe.profile} profile)",
                            examples["folder"])

    forgetting = ", ".join(
        f"{label(n)} {pct(get(models[n], 'understanding', 'accuracy'))}" for n in ("base", "full-ft", "lora"))
    qcount = metrics["questions"]
    md = [
        f"# TWIST & SCOUT demo ({recipe.profile} profile)",
        "",
        "A tiny LLaVA-1.5 instruction-tuned with LLaVA's own trainer (the base), then taught step-by-step grounding "
        f"on the same data and step budget by full fine-tuning, LoRA and TWIST, all on {where(recipe)}. "
        "Held-out questions: "
        f"{qcount.get('refexp', 0)} referring expressions, {qcount.get('localization', 0)} find-all queries, "
        f"{qcount.get('vqa', 0)} understanding questions.",
        "",
        "## Results (held-out scenes)",
        "",
        results_table(names, models, stamps),
        "",
        "Acc@0.5 and mean IoU: referring expressions (simple / hard queries); find-all recall@0.5: localisation of "
        "every matching object; understanding acc: exact match on held-out questions; identical to base: "
        "answers to those questions with exactly the base's text; router acc: TWIST's route (auto) on every "
        "held-out prompt against its task (grounding prompts -> grounding route, understanding -> frozen).",
        "",
        "## What it must show",
        "",
        f"Best TWIST variant: **{label(best)}** (the playground opens it; its examples are the first "
        f"{examples['n']} held-out referring expressions, of which it got {examples['correct']} right).",
        "",
        *(c.line() for v in recipe.twist_variants for c in checks[v.stage]),
        "",
        f"Forgetting (understanding accuracy after grounding training): {forgetting}.",
        "",
        understanding_by_type_table(names, models),
        "",
        vision_line(stamps.get("model") or stamps.get("base")),
        "",
        image_reliance_line(metrics.get("image_reliance")),
        "",
        base_region_line(get(metrics, "base_one_shot", "region")),
        "",
        *chain_loss_section(recipe, names, models),
        *misses_section(names, models),
        "## Held-out scenes",
        "",
        f"![grid](grid.png) ({rows} scenes; the ground-truth box is black in white; under each image, the steps "
        "that model wrote)",
        "",
        "## Settings",
        "",
        settings_table(recipe),
        "",
        "## Time per stage",
        "",
        times_table(stamps, order),
        "",
        f"Logs: `{os.path.relpath(layout.logs, out)}/<stage>.log`; models: `{os.path.relpath(layout.models, out)}`.",
        "",
    ]
    atomic_write_text(str(out / "report.md"), "\n".join(md))

    results = {
        "profile": recipe.profile,
        "recipe": recipe.to_json(),
        "questions": qcount,
        "image_reliance": metrics.get("image_reliance"),
        "base_one_shot": metrics.get("base_one_shot"),
        "models": {n: {**models[n], "path": os.path.relpath(dirs[n], out),
                       "trainable_params": get(stamps.get(n, {}), "info", "trainable_params"),
                       "train": {k: get(stamps.get(n, {}), "info", k) for k in ("steps", "first_loss", "last_loss")}}
                   for n in names},
        "best_twist": best,
        "checks": [c.to_json() for v in recipe.twist_variants for c in checks[v.stage]],
        "stages": {n: {"seconds": stamps[n].get("seconds"), "finished": stamps[n].get("finished")}
                   for n in order if n in stamps},
        "playground": pointer,
    }
    for m in results["models"].values():
        if isinstance(m.get("refexp"), dict):
            m["refexp"] = {k: v for k, v in m["refexp"].items() if k != "predictions"}
    write_json(out / "results.json", results)
    return {"best_twist": best, "grid_rows": rows,
            "checks_passed": sum(bool(c.passed) for cs in checks.values() for c in cs)}

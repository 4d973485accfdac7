"""The demo's evaluation: held-out question files, every model's answers under each prompt, and their scores.

Files, under ``work/eval`` (scorable without this code):

- ``questions/refexp-dev.jsonl``, ``questions/refexp-test.jsonl``: referring expressions of fresh scenes
  (``question_id``, ``image``, ``text``, ``expression``, ``bbox_xyxy_px``, ``width``, ``height``, ``box_frame``,
  ``expression_type``); ``questions/refexp.jsonl`` is both, what the models answer;
  ``questions/understanding.jsonl`` (``question_id``, ``image``, ``text``, ``answer``, ``question_type``).
  Images are relative to ``work/data``.
- ``models/<model>/<prompt>/answers.jsonl``: LLaVA's answer JSONL, ``<model>`` one of ``base``, ``full-ft``,
  ``lora``, ``twist`` (variants ``twist-NAME``), ``<prompt>`` one of ``rec`` (LLaVA-1.5's REC prompt), ``scout``
  (the step-by-step prompt), ``understanding``.
- ``metrics.json``: every score; each model's headline uses the prompt that is better on dev, reported on test,
  compared with the base (and TWIST with full FT) on the same questions (``llava_twist.eval.paired``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_twist.demo.chain_misses import chain_misses
from llava_twist.demo.pipeline import Context, Layout, read_json, write_json
from llava_twist.demo.recipe import Recipe, config_hash
from llava_twist.model.routes import TASK_ROUTE
from scout_data.output import atomic_write_text

PROMPTS = {"rec": "llava", "scout": "scout"}  # the demo's prompt names -> ``model_grounding --prompt``
UNDERSTANDING = "understanding"
UNTYPED = "untyped"  # a referring expression whose question carries no expression_type
REFEXP_SETS = ("dev", "test")
HEADLINE_SET = "test"
HELDOUT = "heldout"  # data folders heldout-dev, heldout-test, heldout-understanding (``Recipe.heldout``)
ANSWER_LOSS = Path(__file__).parents[1] / "eval" / "answer_loss.py"
QUESTION_KEYS = ("question_id", "image", "text", "expression", "bbox_xyxy_px", "width", "height", "box_frame",
                 "expression_type", "difficulty", "answer", "question_type", "kind", "task")


@dataclass(frozen=True)
class Evaluated:
    """A model the demo scores: its name in the eval files, the stage that made it, its folder."""

    name: str
    stage: str
    folder: Path

    @property
    def twist(self) -> bool:
        return self.name.startswith("twist")


def evaluated_models(recipe: Recipe, layout: Layout) -> list[Evaluated]:
    """In report order: base, full FT, LoRA (merged), TWIST (the recipe's first variant), then ``twist-NAME``."""
    models = [Evaluated("base", "base", layout.model("base")), Evaluated("full-ft", "full-ft", layout.model("full-ft")),
              Evaluated("lora", "lora", layout.model("lora") / "merged")]
    for name, v in zip(twist_names(recipe), recipe.twist_variants, strict=True):
        models.append(Evaluated(name, v.stage, layout.model(v.stage)))
    return models


def twist_names(recipe: Recipe) -> list[str]:
    """The eval names of the recipe's TWIST variants: ``twist`` for the first, ``twist-NAME`` for the others."""
    return ["twist" if i == 0 else f"twist-{v.name}" for i, v in enumerate(recipe.twist_variants)]


def heldout_folder(layout: Layout, name: str) -> Path:
    return layout.data / f"{HELDOUT}-{name}"


def heldout_records(layout: Layout, name: str) -> list[dict[str, Any]]:
    return json.loads((heldout_folder(layout, name) / "test.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- questions


def build_questions(layout: Layout, limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """``questions/*.jsonl`` from the held-out sets (ids ``dev/...``, ``test/...``, ``u/...``, images relative to
    ``work/data``); at most ``limit`` questions per set."""
    from llava_twist.eval.scout_questions import question_for

    sets: dict[str, list[dict[str, Any]]] = {}
    for name in (*REFEXP_SETS, UNDERSTANDING):
        prefix = "u" if name == UNDERSTANDING else name
        rows = []
        for record in heldout_records(layout, name):
            got = question_for(record)
            if got is None or (limit is not None and len(rows) >= limit):
                continue
            q = {**got[1], "question_id": f"{prefix}/{record['id']}", "image": f"{HELDOUT}-{name}/images/"
                 f"{got[1]['image']}", "difficulty": record.get("difficulty"), "task": record.get("task")}
            rows.append({k: q[k] for k in QUESTION_KEYS if q.get(k) is not None})
        sets[name] = rows
    qdir = question_dir(layout)
    files = {f"refexp-{s}": sets[s] for s in REFEXP_SETS}
    files |= {"refexp": [q for s in REFEXP_SETS for q in sets[s]], UNDERSTANDING: sets[UNDERSTANDING]}
    for name, rows in files.items():
        atomic_write_text(str(qdir / f"{name}.jsonl"), "".join(json.dumps(q) + "\n" for q in rows))
    return sets


def question_dir(layout: Layout) -> Path:
    return layout.eval / "questions"


def answers_file(layout: Layout, model: str, prompt: str) -> Path:
    return layout.eval / "models" / model / prompt / "answers.jsonl"


# ---------------------------------------------------------------- answering


def model_args(ctx: Context, model: Evaluated) -> list[str]:
    """How the eval tools load a model: TWIST as a delta on the base, route auto; else plain LLaVA."""
    if model.twist:
        return ["--model-base", str(ctx.layout.model("base")), "--route", "auto"]
    return ["--model-class", "llava"]


def run_cached(ctx: Context, output: Path, key: dict[str, Any], module: str, args: list[str]) -> bool:
    """``python -m module *args`` unless ``output`` exists and was made for the same ``key`` (kept in a stamp
    beside it). Returns whether it ran."""
    digest = config_hash(key)
    stamp = output.with_name(f".{output.stem}.json")
    if output.is_file() and stamp.is_file() and read_json(stamp).get("key") == digest:
        return False
    output.parent.mkdir(parents=True, exist_ok=True)
    ctx.python_module(module, *args)
    write_json(stamp, {"key": digest})
    return True


def answer(ctx: Context, model: Evaluated, questions: Path, out: Path, prompt: str = "scout") -> bool:
    """``llava_twist.eval.model_grounding`` for one model and question file (``prompt``: its ``--prompt``),
    cached on the model's stamp and the questions. Returns whether it ran."""
    from llava_twist.serve.inference import DEFAULT_CONV_MODE

    spec = ctx.recipe.eval
    key = {"model": ctx.stamps[model.stage]["id"], "questions": questions.read_text(),
           "eval": [spec.max_new_tokens, spec.batch_size], "conv_mode": DEFAULT_CONV_MODE, "prompt": prompt}
    return run_cached(ctx, out, key, "llava_twist.eval.model_grounding", [
        "--model-path", str(model.folder),
        "--model-id", model.name,
        "--question-file", str(questions),
        "--image-folder", str(ctx.layout.data),
        "--answers-file", str(out),
        "--batch-size", str(spec.batch_size),
        "--max_new_tokens", str(spec.max_new_tokens),
        "--conv-mode", DEFAULT_CONV_MODE,
        "--temperature", "0",
        "--device", ctx.recipe.device,
        "--prompt", prompt,
        "--overwrite",
        *model_args(ctx, model),
    ])


def answer_all(ctx: Context, model: Evaluated) -> dict[str, list[dict[str, Any]]]:
    """The model's answers to every held-out question under each prompt (``models/<model>/<prompt>``)."""
    from llava_twist.eval.common import read_jsonl

    qdir, found = question_dir(ctx.layout), {}
    jobs = {**{p: (qdir / "refexp.jsonl", style) for p, style in PROMPTS.items()},
            UNDERSTANDING: (qdir / f"{UNDERSTANDING}.jsonl", "scout")}
    for prompt, (questions, style) in jobs.items():
        out = answers_file(ctx.layout, model.name, prompt)
        ran = answer(ctx, model, questions, out, style)
        ctx.note(f"# {model.name} / {prompt}: {'answered' if ran else 'answers cached'}")
        found[prompt] = read_jsonl(str(out), "answers")
    return found


def chain_loss(ctx: Context, model: Evaluated) -> dict[str, Any]:
    """``llava_twist.eval.answer_loss`` on held-out test chains: where the model's loss sits, per box-coordinate
    token and per text token; cached like the answers."""
    layout, limit = ctx.layout, ctx.recipe.eval.limit
    folder = heldout_folder(layout, HEADLINE_SET)
    chains, result = folder / "test.json", layout.eval / "models" / model.name / "answer_loss.json"
    key = {"model": ctx.stamps[model.stage]["id"], "data": chains.read_text(), "num": limit,
           "code": config_hash(ANSWER_LOSS.read_text(encoding="utf-8"))}
    run_cached(ctx, result, key, "llava_twist.eval.answer_loss", [
        "--model-path", str(model.folder), "--data", str(chains), "--image-folder", str(folder / "images"),
        "--num", str(limit), "--device", ctx.recipe.device, "--out", str(result), *model_args(ctx, model)])
    return read_json(result)


# ---------------------------------------------------------------- scoring


def refexp_scores(questions: list[dict[str, Any]], answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Acc@0.5, mean IoU and unparseable answers, by expression type too, with each question's right/wrong."""
    from llava_twist.eval.eval_refexp import score_refexp

    result = score_refexp(questions, answers)
    correct = {str(r["question_id"]): bool(r["correct"]) for r in result["rows"]}
    scored = [q for q in questions if q["question_id"] in correct]

    def split(key: str, default: str) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[bool]] = {}
        for q in scored:
            groups.setdefault(q.get(key) or default, []).append(correct[q["question_id"]])
        return {g: {"n": len(v), "acc@0.5": _mean(v)} for g, v in sorted(groups.items())}

    return {"n": result["n"], **{k: result["metrics"][k] for k in ("acc@0.5", "mean_iou", "parse_failure_rate")},
            "by_type": split("expression_type", UNTYPED), **split("difficulty", "simple"), "correct": correct}


def understanding_scores(questions: list[dict[str, Any]], answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy of short answers to the understanding questions, by question type, with each
    question's right/wrong."""
    from llava_twist.eval.common import answers_by_id
    from llava_twist.eval.eval_retention import is_correct

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
    from llava_twist.eval.paired import paired_difference

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
    from llava_twist.eval.common import answers_by_id

    a, b = answers_by_id(base), answers_by_id(other)
    same = [str(a[q].get("text", "")).strip() == str(b.get(q, {}).get("text", "")).strip() for q in a]
    return {"n": len(same), "identical_rate": _mean(same)}


def evaluate(ctx: Context) -> dict[str, Any]:
    """Answer the held-out questions with every model under each prompt and score them (``metrics.json``)."""
    recipe, layout = ctx.recipe, ctx.layout
    questions = build_questions(layout)
    models = evaluated_models(recipe, layout)
    answers = {m.name: answer_all(ctx, m) for m in models}
    scores = {m.name: score_model(questions, answers[m.name]) for m in models}
    test_records = {f"{HEADLINE_SET}/{r['id']}": r for r in heldout_records(layout, HEADLINE_SET)}
    base = scores["base"]
    seed = recipe.seed
    for m in models:
        s = scores[m.name]
        s["misses"] = chain_misses(questions[HEADLINE_SET], answers[m.name][s["prompt"]], test_records)
        s["chain_loss"] = chain_loss(ctx, m)
        if m.twist:
            s["router"] = router_scores(answers[m.name])
        if m.name == "base":
            continue
        s["vs_base"] = compare(s["headline"]["correct"], base["headline"]["correct"], seed)
        s["vs_base_same_prompt"] = {
            p: compare(s["refexp"][p][HEADLINE_SET]["correct"], base["refexp"][p][HEADLINE_SET]["correct"], seed)
            for p in PROMPTS}
        s["retention"] = {
            **identical_rate(answers["base"][UNDERSTANDING], answers[m.name][UNDERSTANDING]),
            "vs_base": compare(s[UNDERSTANDING]["correct"], base[UNDERSTANDING]["correct"], seed)}
        if m.twist:
            s["vs_full_ft"] = compare(s["headline"]["correct"], scores["full-ft"]["headline"]["correct"], seed)
    counts = {name: len(rows) for name, rows in questions.items()}
    counts["test_by_type"] = dict(Counter(q.get("expression_type") or UNTYPED for q in questions[HEADLINE_SET]))
    write_json(layout.eval / "metrics.json", {"questions": counts, "models": scores})
    return {"questions": counts, "prompts": {m.name: scores[m.name]["prompt"] for m in models}}


# ---------------------------------------------------------------- the base's card (make base)


def evaluate_base(ctx: Context) -> dict[str, Any]:
    """The figures of a base's card (``make base``): held-out understanding, one-shot Acc@0.5 with LLaVA-1.5's REC
    prompt on the held-out referring expressions and on its own region prompts, and how much it uses the image."""
    from llava_twist.eval.common import read_jsonl

    layout, limit = ctx.layout, ctx.recipe.base_eval_limit
    questions = build_questions(layout, limit)
    base = Evaluated("base", "base", layout.model("base"))
    region = region_questions(layout, limit)
    jobs = {UNDERSTANDING: (question_dir(layout) / f"{UNDERSTANDING}.jsonl", "scout"),
            "refexp": (question_dir(layout) / f"refexp-{HEADLINE_SET}.jsonl", PROMPTS["rec"]),
            "region": (region, "scout")}
    answers = {}
    for name, (file, style) in jobs.items():
        out = ctx.folder / name / "answers.jsonl"
        answer(ctx, base, file, out, style)
        answers[name] = read_jsonl(str(out), "answers")
    figures = {
        UNDERSTANDING: summary(understanding_scores(questions[UNDERSTANDING], answers[UNDERSTANDING])),
        "one_shot": {"refexp": summary(refexp_scores(questions[HEADLINE_SET], answers["refexp"])),
                     "region": summary(refexp_scores(read_jsonl(str(region), "questions"), answers["region"]))},
        "image_reliance": image_reliance(ctx, base.folder, ctx.folder / "image_reliance.json"),
    }
    write_json(ctx.folder / "figures.json", figures)
    return figures


def summary(scores: dict[str, Any]) -> dict[str, Any]:
    """Scores without the per-question right/wrong (which ``metrics.json`` keeps)."""
    return {k: v for k, v in scores.items() if k != "correct"}


def region_questions(layout: Layout, limit: int) -> Path:
    """The base's own held-out one-shot box prompts (its data's test split), as a question file."""
    from llava_twist.eval.scout_questions import question_for

    rows = []
    for record in json.loads((layout.data / "base" / "test.json").read_text(encoding="utf-8")):
        got = question_for(record) if record.get("kind") == "region" else None
        if got is not None and len(rows) < limit:
            rows.append({**got[1], "question_id": f"r/{record['id']}", "image": f"base/images/{got[1]['image']}",
                         "difficulty": record.get("difficulty")})
    path = question_dir(layout) / "region.jsonl"
    atomic_write_text(str(path), "".join(json.dumps(q) + "\n" for q in rows))
    return path


def image_reliance(ctx: Context, model_dir: Path, out: Path) -> dict[str, Any]:
    """The base's loss on its training records with their own images and with the images shuffled."""
    layout = ctx.layout
    ctx.python_module("llava_twist.demo.image_reliance", "--model-path", str(model_dir),
                      "--data", str(layout.data / "base" / "train.json"),
                      "--image-folder", str(layout.data / "base" / "images"), "--out", str(out))
    return read_json(out)

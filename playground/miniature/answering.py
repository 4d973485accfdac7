"""Answering the demo's held-out questions: the question files, each model's answers under each prompt through
``llava_twist.eval.model_grounding`` (and its teacher-forced chain loss through ``llava_twist.eval.answer_loss``),
cached on the model's stamp and the questions.

Files, under ``work/eval`` (scorable without this code):

- ``questions/refexp-dev.jsonl``, ``questions/refexp-test.jsonl``: referring expressions of fresh scenes
  (``question_id``, ``image``, ``text``, ``expression``, ``bbox_xyxy_px``, ``width``, ``height``, ``box_frame``,
  ``expression_type``); ``questions/refexp.jsonl`` is both, what the models answer;
  ``questions/understanding.jsonl`` (``question_id``, ``image``, ``text``, ``answer``, ``question_type``).
  Images are relative to ``work/data``.
- ``models/<model>/<prompt>/answers.jsonl``: LLaVA's answer JSONL, ``<model>`` one of ``base``, ``full-ft``,
  ``lora``, ``twist`` (variants ``twist-NAME``), ``<prompt>`` one of ``rec`` (LLaVA-1.5's REC prompt), ``scout``
  (the step-by-step prompt), ``understanding``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from llava_twist.eval.common import read_jsonl
from llava_twist.eval.scout_questions import question_for
from llava_twist.serve.prompting import DEFAULT_CONV_MODE
from playground.miniature.data import HELDOUT
from playground.miniature.recipe import Recipe, config_hash
from playground.miniature.runner import Context, Layout, read_json, write_json
from scout_data.output import atomic_write_text

PROMPTS = {"rec": "llava", "scout": "scout"}  # the demo's prompt names -> ``model_grounding --prompt``
UNDERSTANDING = "understanding"
REFEXP_SETS = ("dev", "test")
HEADLINE_SET = "test"
ANSWER_LOSS = Path(find_spec("llava_twist.eval.answer_loss").origin)
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
    models = [Evaluated("base", "base", layout.model("base"))]
    if recipe.run_full_ft:
        models.append(Evaluated("full-ft", "full-ft", layout.model("full-ft")))
    if recipe.run_lora:
        models.append(Evaluated("lora", "lora", layout.model("lora") / "merged"))
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


def build_questions(layout: Layout, limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """``questions/*.jsonl`` from the held-out sets (ids ``dev/...``, ``test/...``, ``u/...``, images relative to
    ``work/data``); at most ``limit`` questions per set."""
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


def region_questions(layout: Layout, limit: int) -> Path:
    """The base's own held-out one-shot box prompts (its data's test split), as a question file."""
    rows = []
    for record in json.loads((layout.data / "base" / "test.json").read_text(encoding="utf-8")):
        got = question_for(record) if record.get("kind") == "region" else None
        if got is not None and len(rows) < limit:
            rows.append({**got[1], "question_id": f"r/{record['id']}", "image": f"base/images/{got[1]['image']}",
                         "difficulty": record.get("difficulty")})
    path = question_dir(layout) / "region.jsonl"
    atomic_write_text(str(path), "".join(json.dumps(q) + "\n" for q in rows))
    return path


def question_dir(layout: Layout) -> Path:
    return layout.eval / "questions"


def answers_file(layout: Layout, model: str, prompt: str) -> Path:
    return layout.eval / "models" / model / prompt / "answers.jsonl"


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


def image_reliance(ctx: Context, model_dir: Path, out: Path) -> dict[str, Any]:
    """The base's loss on its training records with their own images and with the images shuffled."""
    layout = ctx.layout
    ctx.python_module("playground.miniature.image_reliance", "--model-path", str(model_dir),
                      "--data", str(layout.data / "base" / "train.json"),
                      "--image-folder", str(layout.data / "base" / "images"), "--out", str(out))
    return read_json(out)

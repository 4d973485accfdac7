"""The ``data`` stage: every synthetic set of a run through ``scout_data``'s command line, the replay and the
training mixes, and their statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from playground.miniature.recipe import TRAINING_SETS
from playground.miniature.runner import Context, Layout, StageError, write_json
from scout_data.output import atomic_write_text, dumps_records
from scout_data.stats import dataset_stats
from scout_data.validate import load_records

HELDOUT = "heldout"  # data folders heldout-dev, heldout-test, heldout-understanding (``Recipe.heldout``)
ONE_SHOT_KIND = "region"  # LLaVA-1.5's REC form: a one-shot referring expression record


def build_data(ctx: Context) -> dict[str, Any]:
    """Base data (understanding + one-shot boxes), the grounding records, each training set (the grounding records
    or the one-shot ones alone, with understanding replay), the held-out sets and each warm-up lesson's records."""
    recipe, data = ctx.recipe, ctx.folder
    lessons = () if recipe.shipped_base else recipe.warmups  # a released base has had its lessons
    sets = [("base", recipe.base_data), ("grounding", recipe.grounding_data),
            *((f"{HELDOUT}-{name}", spec) for name, spec in recipe.heldout.sets().items()),
            *((w.stage, w.data) for w in lessons)]
    for name, spec in sets:
        ctx.python_module("scout_data", "synth", "--out", str(data / name), "--quiet", *spec.synth_args(recipe.seed),
                          threads=1)
    base_train = load_records(str(data / "base" / "train.json"))
    replay = [r for r in base_train if r.get("task") == "understanding"]
    if not replay:
        raise StageError(ctx.stage, "the base data has no understanding records to replay", ctx.log)
    atomic_write_text(str(data / "replay.json"), dumps_records(replay))
    grounding = {"mixed": data / "grounding" / "train.json", "rec": data / "grounding" / "rec.json"}
    one_shot = [r for r in load_records(str(grounding["mixed"])) if r.get("kind") == ONE_SHOT_KIND]
    atomic_write_text(str(grounding["rec"]), dumps_records(one_shot))
    for name in TRAINING_SETS:  # every variant's, so that adding a variant to a run keeps its data
        ctx.python_module(
            "scout_data", "mix", "--scout", str(grounding[name]), "--replay", str(data / "replay.json"),
            "--out", str(training_set(ctx.layout, name)), "--ratio", f"{recipe.replay_ratio:g}",
            "--seed", str(recipe.seed), "--scout-image-prefix", "grounding/images",
            "--replay-image-prefix", "base/images", "--overwrite", threads=1,
        )
    heldout = [f"{HELDOUT}-{name}/test.json" for name in recipe.heldout.sets()]
    files = ["base/train.json", "grounding/train.json", *heldout,
             *(training_set(ctx.layout, name).name for name in TRAINING_SETS),
             *(f"{w.stage}/train.json" for w in lessons)]
    stats = {name: dataset_stats(load_records(str(data / name))) for name in files}
    write_json(data / "stats.json", stats)
    return {name: {"records": s["records"], "task": s["task"], "difficulty": s["difficulty"]}
            for name, s in stats.items()}


def training_set(layout: Layout, name: str) -> Path:
    """The grounding runs' records (``TwistVariant.data``): ``mixed.json``, or ``mixed-<name>.json``."""
    return layout.data / ("mixed.json" if name == "mixed" else f"mixed-{name}.json")

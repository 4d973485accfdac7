"""The stage list of ``make demo`` and ``make base``: each stage's folder, the stages it reads from, its body, and
the slice of the recipe it reads (what its cache stamp hashes; ``threads`` is never part of it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from playground.miniature import answering, chain_misses, evaluation, grid, markdown, report, scoring
from playground.miniature.checkout import REPO
from playground.miniature.data import build_data
from playground.miniature.evaluation import evaluate, evaluate_base
from playground.miniature.recipe import Recipe, TwistVariant, Warmup
from playground.miniature.release import release_weights
from playground.miniature.report import write_report
from playground.miniature.runner import Layout, Stage
from playground.miniature.training import (
    build_model,
    import_base,
    stage_model,
    train_base,
    train_full_ft,
    train_lora,
    train_twist,
    train_warmup,
    warmup_start,
)

# The code of the cheap stages is part of their stamps: a change to how answers are scored or reported redoes them.
EVAL_CODE = tuple(Path(m.__file__) for m in (answering, scoring, chain_misses, evaluation)) + (answering.ANSWER_LOSS,)
REPORT_CODE = tuple(Path(m.__file__) for m in (report, markdown, grid))


def _common(r: Recipe) -> dict[str, Any]:
    return {"model_max_length": r.model_max_length, "seed": r.seed, **r.where()}


def _grounding_run(r: Recipe) -> dict[str, Any]:
    return {**_common(r), "train_seed": r.train_seed}


def model_config(r: Recipe) -> dict[str, Any]:
    vision = asdict(r.vision) if r.vision else None
    return {"model": asdict(r.model), "vision": vision, "world": asdict(r.base_data) if vision else None,
            "seed": r.seed}


def data_config(r: Recipe) -> dict[str, Any]:
    return {"seed": r.seed, "base_data": asdict(r.base_data), "grounding_data": asdict(r.grounding_data),
            "replay_ratio": r.replay_ratio, "heldout": asdict(r.heldout),
            "warmup_data": {w.name: asdict(w.data) for w in r.warmups}}


def warmup_config(w: Warmup) -> Callable[[Recipe], dict[str, Any]]:
    return lambda r: {**_common(r), "train": asdict(w.train)}


def base_config(r: Recipe) -> dict[str, Any]:
    if r.shipped_base:
        return {"shipped_base": r.shipped_base, "base_hash": r.base_hash()}
    return {**_common(r), "train": asdict(r.base)}


def base_eval_config(r: Recipe) -> dict[str, Any]:
    return {"eval": asdict(r.eval), "limit": r.base_eval_limit}


def twist_config(v: TwistVariant) -> Callable[[Recipe], dict[str, Any]]:
    return lambda r: {**_grounding_run(r), "train": asdict(r.twist), "flags": [*r.twist_flags, *v.flags],
                      "data": v.data, "nproc": r.twist_nproc, **({"match_one_shot": True} if v.match_one_shot else {})}


def full_ft_config(r: Recipe) -> dict[str, Any]:
    return {**_grounding_run(r), "train": asdict(r.full_ft)}


def lora_config(r: Recipe) -> dict[str, Any]:
    return {**_grounding_run(r), "train": asdict(r.lora), "r": r.lora_r, "alpha": r.lora_alpha,
            "mm_projector_lr": r.lora_mm_projector_lr}


def eval_config(r: Recipe) -> dict[str, Any]:
    return {"eval": asdict(r.eval), **r.where()}


def report_config(r: Recipe) -> dict[str, Any]:
    return {k: v for k, v in r.to_json().items() if k != "threads"}


def build_stages(recipe: Recipe, base_only: bool = False) -> list[Stage]:
    """Every stage in run order. With a released base the base is imported, not trained; ``base_only``
    (``make base``): the stages that make and measure the base."""

    def folder(stage: str) -> Callable[[Layout], Path]:
        return lambda lay: stage_model(lay, stage)

    data = Stage("data", lambda lay: lay.data, (), build_data, data_config)
    if recipe.shipped_base and not base_only:
        head = [data, Stage("base", folder("base"), (), import_base, base_config,
                            code=(release_weights(REPO / recipe.shipped_base),))]
    else:
        warmups = [Stage(w.stage, folder(w.stage), (warmup_start(recipe, w.stage), "data"), train_warmup,
                         warmup_config(w)) for w in recipe.warmups]
        head = [Stage("model", folder("model"), (), build_model, model_config), data, *warmups,
                Stage("base", folder("base"), (warmup_start(recipe, "base"), "data"), train_base, base_config)]
    if base_only:
        return [*head, Stage("base-eval", lambda lay: lay.eval, ("data", "base"), evaluate_base, base_eval_config,
                             clean=False)]
    twist = [Stage(v.stage, folder(v.stage), ("base", "data"), train_twist, twist_config(v))
             for v in recipe.twist_variants]
    lora = [Stage("lora", folder("lora"), ("base", "data"), train_lora, lora_config)] if recipe.run_lora else []
    full_ft = [Stage("full-ft", folder("full-ft"), ("base", "data"), train_full_ft, full_ft_config)
               ] if recipe.run_full_ft else []
    trained = ("base", *(s.name for s in (*full_ft, *lora)), *(v.stage for v in recipe.twist_variants))
    return [
        *head,
        *twist,
        *full_ft,
        *lora,
        Stage("eval", lambda lay: lay.eval, ("data", *trained), evaluate, eval_config, clean=False, code=EVAL_CODE),
        Stage("report", lambda lay: lay.work / "report", ("eval", *trained), write_report, report_config,
              code=REPORT_CODE),
    ]


def stage_config(recipe: Recipe, name: str) -> dict[str, Any]:
    """The slice of ``recipe`` that stage ``name`` (of ``make demo`` or ``make base``) reads."""
    for stage in (*build_stages(recipe), *build_stages(recipe, base_only=True)):
        if stage.name == name:
            return stage.config(recipe)
    raise KeyError(f"no stage {name!r} in this recipe")

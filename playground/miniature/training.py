"""The stages that make models: the tiny model, the base's lessons and the base (or the released base, imported),
and the grounding runs (TWIST, full fine-tuning, LoRA), each through a command line (``launch``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_twist.model.builder import DELTA_WEIGHTS
from llava_twist.spec_cli import spec_flags
from playground.miniature.checkout import REPO
from playground.miniature.checkpoints import checkpoint_weights, language_model_params, tensor_numel, vision_tower_of
from playground.miniature.launch import grounding_train_args, llava_train_args, twist_launch
from playground.miniature.recipe import Recipe
from playground.miniature.release import install_release
from playground.miniature.runner import Context, Layout, StageError, cpu_count, read_json


def trainer_summary(folder: Path) -> dict[str, Any]:
    """Steps run and the first and last logged training loss, from ``trainer_state.json`` (HF Trainer)."""
    path = folder / "trainer_state.json"
    if not path.is_file():
        return {}
    state = read_json(path)
    losses = [e for e in state.get("log_history", []) if "loss" in e]
    return {
        "steps": state.get("global_step"),
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
    }


def build_model(ctx: Context) -> dict[str, Any]:
    """The tiny LLaVA-1.5 folder; its vision tower pretrained on the scene world when the recipe says so."""
    ctx.python_module("llava_twist.tiny", "--out", str(ctx.folder), *spec_flags(ctx.recipe.model))
    summary: dict[str, Any] = {"params": sum(tensor_numel(p) for p in checkpoint_weights(ctx.folder))}
    vision = ctx.recipe.vision
    if vision is not None:
        tower = Path(vision_tower_of(ctx.folder))
        ctx.python_module("playground.miniature.vision_pretrain", "--tower", str(tower), *spec_flags(vision),
                          *ctx.recipe.base_data.synth_args(ctx.recipe.seed))
        result = read_json(tower / "dense_pretraining.json")
        summary["vision_pretraining"] = {"seconds": result["seconds"], "held_out": result["after"]}
    return summary


def warmup_start(recipe: Recipe, stage: str) -> str:
    """The model stage a warm-up lesson (or ``base``) trains from: the previous lesson's, else the tiny model."""
    names = [w.stage for w in recipe.warmups]
    before = names[: names.index(stage)] if stage in names else names
    return before[-1] if before else "model"


def stage_model(layout: Layout, stage: str) -> Path:
    """The model folder a stage writes (``model`` writes ``tiny``), for the stage list and the stage bodies."""
    return layout.model("tiny" if stage == "model" else stage)


def train_warmup(ctx: Context) -> dict[str, Any]:
    """One of the base's first lessons (``Recipe.warmups``): LLaVA's trainer on its easy records, from the
    previous lesson's model (the first: from the tiny model)."""
    warmup = next(w for w in ctx.recipe.warmups if w.stage == ctx.stage)
    data = ctx.layout.data / warmup.stage
    start = stage_model(ctx.layout, warmup_start(ctx.recipe, ctx.stage))
    ctx.run(llava_train_args(ctx, start, data / "train.json", data / "images", ctx.folder, warmup.train))
    return trainer_summary(ctx.folder)


def train_base(ctx: Context) -> dict[str, Any]:
    """LLaVA-1.5 stage 2 (full fine-tuning) on the base data, from the last warm-up lesson's model (or the
    tiny model): our "LLaVA-1.5"."""
    layout = ctx.layout
    start = stage_model(layout, warmup_start(ctx.recipe, "base"))
    data = layout.data / "base"
    ctx.run(llava_train_args(ctx, start, data / "train.json", data / "images", ctx.folder, ctx.recipe.base))
    return {**trainer_summary(ctx.folder), "trainable_params": language_model_params(ctx.folder)}


def import_base(ctx: Context) -> dict[str, Any]:
    """The released base (``Recipe.shipped_base``, made by ``make base``), copied into the run as a LLaVA user
    downloads ``liuhaotian/llava-v1.5-7b``; its card must name this recipe's base hash."""
    card = install_release(REPO / str(ctx.recipe.shipped_base), ctx.folder, ctx.recipe.base_hash())
    return {"release": ctx.recipe.shipped_base, "recipe_hash": card["recipe_hash"], "figures": card["figures"],
            "vision_pretraining": card.get("vision_pretraining"), "trainable_params": language_model_params(ctx.folder)}


def train_full_ft(ctx: Context) -> dict[str, Any]:
    """LLaVA's full fine-tuning of the base on the grounding mix (the forgetting baseline)."""
    ctx.run(grounding_train_args(ctx, ctx.folder, ctx.recipe.full_ft))
    return {**trainer_summary(ctx.folder), "trainable_params": language_model_params(ctx.folder)}


def train_lora(ctx: Context) -> dict[str, Any]:
    """LLaVA's own LoRA path on the grounding mix, then merged with LLaVA's loader into a plain checkpoint."""
    recipe, layout = ctx.recipe, ctx.layout
    adapter, merged = ctx.folder / "adapter", ctx.folder / "merged"
    extra = ["--lora_enable", "True", "--lora_r", str(recipe.lora_r), "--lora_alpha", str(recipe.lora_alpha),
             "--mm_projector_lr", f"{recipe.lora_mm_projector_lr:g}"]
    ctx.run(grounding_train_args(ctx, adapter, recipe.lora, extra))
    ctx.python_module("playground.miniature.merge_lora", "--lora-dir", str(adapter),
                      "--base", str(layout.model("base")), "--out", str(merged))
    trainable = sum(tensor_numel(p) for p in adapter.glob("adapter_model.*"))
    trainable += tensor_numel(adapter / "non_lora_trainables.bin")
    return {**trainer_summary(adapter), "trainable_params": trainable}


def train_twist(ctx: Context) -> dict[str, Any]:
    """TWIST through the DeepSpeed launcher with ZeRO-3 (:func:`twist_launch` says which script and how)."""
    recipe = ctx.recipe
    variant = next(v for v in recipe.twist_variants if v.stage == ctx.stage)
    nproc = recipe.twist_nproc
    if recipe.twist.batch % nproc:
        raise StageError(ctx.stage, f"TWIST batch {recipe.twist.batch} does not split over {nproc} processes")
    launcher, env, extra = twist_launch(recipe, ctx.layout, variant, ctx.folder, ctx.python)
    if not launcher.is_file():
        raise StageError(ctx.stage, f"{launcher} not found (run the demo from a source checkout)")
    threads = max(1, min(recipe.threads or cpu_count(), cpu_count() // nproc))
    ctx.run(["bash", str(launcher), *extra], threads=threads, env=env, cwd=REPO)
    delta = ctx.folder / DELTA_WEIGHTS
    if not delta.is_file():
        raise StageError(ctx.stage, f"the launcher exited 0 but wrote no {DELTA_WEIGHTS}", ctx.log)
    return {**trainer_summary(ctx.folder), "trainable_params": tensor_numel(delta), "flags": list(variant.flags),
            "data": variant.data}

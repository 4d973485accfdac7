"""The command lines of the training stages: LLaVA's own trainer as its ``finetune.sh`` calls it, and the TWIST
launchers users run (``scripts/finetune_twist_cpu.sh``, on CUDA ``scripts/finetune_twist.sh``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from playground.miniature.checkout import LLAVA_DS_CONFIG, TRAIN_LLAVA, TWIST_ENTRY, TWIST_GPU_LAUNCHER, TWIST_LAUNCHER
from playground.miniature.checkpoints import vision_tower_of
from playground.miniature.data import ONE_SHOT_KIND, training_set
from playground.miniature.recipe import Recipe, TrainSpec, TwistVariant
from playground.miniature.runner import Context, Layout


def deepspeed_command(python: str) -> str:
    """DeepSpeed's launcher beside ``python`` (the venv's), else the one on PATH."""
    found = Path(python).parent / "deepspeed"
    return str(found) if found.is_file() else "deepspeed"


def precision_args(recipe: Recipe) -> list[str]:
    """fp32 on CPU; on CUDA bf16 with TF32 matmuls, as LLaVA-1.5's ``finetune.sh``."""
    if recipe.device == "cuda":
        return ["--bf16", "True", "--fp16", "False", "--tf32", "True"]
    return ["--bf16", "False", "--fp16", "False"]


def loader_workers(recipe: Recipe) -> str:
    """One data-loader worker on 2 CPU cores; on a GPU machine enough that LLaVA's preprocessing keeps up."""
    return "4" if recipe.device == "cuda" else "1"


def llava_train_args(ctx: Context, model_dir: Path, data: Path, images: Path, out: Path, spec: TrainSpec,
                     extra: list[str] | None = None, seed: int | None = None, grouped: bool = False) -> list[str]:
    """LLaVA-1.5's own trainer (``llava.train.train``), as its ``finetune.sh`` calls it (fp32 on CPU; bf16 under
    DeepSpeed ZeRO-2 on CUDA), seeded before the model is built (``llava_twist.train.train_llava``: LoRA's adapters
    start the same in every run); ``seed`` defaults to the recipe's; ``grouped``: batches grouped by length (the
    base's stages keep ungrouped batches, as the released base was trained)."""
    recipe = ctx.recipe
    if recipe.device == "cuda":  # under DeepSpeed, as LLaVA's scripts: bf16 weights keep an fp32 master copy
        launch = [deepspeed_command(ctx.python), "--num_gpus", "1", str(TRAIN_LLAVA),
                  "--deepspeed", str(LLAVA_DS_CONFIG)]
    else:
        launch = [ctx.python, "-m", "llava_twist.train.train_llava"]
    return [
        *launch,
        "--model_name_or_path", str(model_dir),
        "--version", "v1",
        "--data_path", str(data),
        "--image_folder", str(images),
        "--vision_tower", vision_tower_of(model_dir),
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", str(grouped),
        "--output_dir", str(out),
        "--max_steps", str(spec.steps),
        "--per_device_train_batch_size", str(spec.batch),
        "--gradient_accumulation_steps", "1",
        "--save_strategy", "no",
        "--learning_rate", f"{spec.lr:g}",
        "--weight_decay", "0.",
        "--warmup_ratio", f"{spec.warmup_ratio:g}",
        "--lr_scheduler_type", spec.scheduler,
        "--logging_steps", "1",
        "--model_max_length", str(recipe.model_max_length),
        "--gradient_checkpointing", "False",
        "--dataloader_num_workers", loader_workers(recipe),
        "--lazy_preprocess", "True",
        "--report_to", "none",
        "--seed", str(recipe.seed if seed is None else seed),
        *precision_args(recipe),
        *(["--mm_projector_lr", f"{spec.mm_projector_lr:g}"] if spec.mm_projector_lr is not None else []),
        *(extra or []),
    ]


def grounding_train_args(ctx: Context, out: Path, spec: TrainSpec, extra: list[str] | None = None) -> list[str]:
    """LLaVA's trainer for a grounding baseline: from the base, on the grounding records, with the grounding runs'
    seed and batches grouped by length, as LLaVA's ``finetune.sh``."""
    layout = ctx.layout
    return llava_train_args(ctx, layout.model("base"), training_set(layout, "mixed"), layout.data, out, spec, extra,
                            seed=ctx.recipe.train_seed, grouped=True)


def one_shot_share(data: Path) -> float:
    """The share of one-shot (REC) records in a training set."""
    records = json.loads(data.read_text(encoding="utf-8"))
    return sum(r.get("kind") == ONE_SHOT_KIND for r in records) / max(1, len(records))


def twist_spec(recipe: Recipe, layout: Layout, variant: TwistVariant) -> TrainSpec:
    """The variant's training: the recipe's TWIST run, or (``match_one_shot``) as many steps as give it the
    one-shot samples the default training set gives the recipe's steps."""
    spec = recipe.twist
    if not variant.match_one_shot:
        return spec
    ratio = one_shot_share(training_set(layout, "mixed")) / one_shot_share(training_set(layout, variant.data))
    return replace(spec, steps=max(1, round(spec.steps * ratio)))


def twist_launch(recipe: Recipe, layout: Layout, variant: TwistVariant, out: Path,
                 python: str) -> tuple[Path, dict[str, str], list[str]]:
    """The TWIST launcher a stage runs, its environment and its extra trainer flags: on CPU
    ``scripts/finetune_twist_cpu.sh`` (DeepSpeed, ZeRO-3, ``twist_nproc`` gloo processes, fp32); on CUDA
    ``scripts/finetune_twist.sh``, the launcher users run (ZeRO-3, bf16, one process per GPU)."""
    spec, nproc = twist_spec(recipe, layout, variant), recipe.twist_nproc
    base = layout.model("base")
    env = {
        "MODEL": str(base),
        "DATA": str(training_set(layout, variant.data)),
        "IMAGES": str(layout.data),
        "OUT": str(out),
        "BATCH": str(spec.batch // nproc),
        "LR": f"{spec.lr:g}",
        "SAVE_STEPS": str(spec.steps + 1),
    }
    extra = [*recipe.twist_flags, *variant.flags, "--model_max_length", str(recipe.model_max_length),
             "--gradient_checkpointing", "False", "--dataloader_num_workers", loader_workers(recipe),
             "--warmup_ratio", f"{spec.warmup_ratio:g}", "--lr_scheduler_type", spec.scheduler,
             "--group_by_modality_length", "True", "--seed", str(recipe.train_seed)]
    if recipe.device == "cuda":
        env.update(GPUS=str(nproc), VISION_TOWER=vision_tower_of(base), REPORT_TO="none",
                   ENTRY=TWIST_ENTRY)
        extra += ["--max_steps", str(spec.steps)]
        return TWIST_GPU_LAUNCHER, env, extra
    env.update(STEPS=str(spec.steps), NPROC=str(nproc), DEEPSPEED=deepspeed_command(python))
    return TWIST_LAUNCHER, env, extra

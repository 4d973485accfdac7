"""The stage bodies of ``make demo``: build, generate, train and evaluate through the project's and LLaVA's
own command lines (subprocesses, the same code paths as on a GPU), each writing into its stage folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_twist.demo.evaluation import ANSWER_LOSS, HELDOUT, evaluate, evaluate_base
from llava_twist.demo.pipeline import (
    Context,
    Layout,
    Stage,
    StageError,
    cpu_count,
    read_json,
    write_json,
)
from llava_twist.demo.recipe import TRAINING_SETS, Recipe, TrainSpec, TwistVariant
from llava_twist.demo.report import write_report
from llava_twist.spec_cli import spec_flags
from scout_data.output import atomic_write_text, dumps_records

REPO = Path(__file__).resolve().parents[2]
TWIST_LAUNCHER = REPO / "scripts" / "finetune_twist_cpu.sh"
TWIST_GPU_LAUNCHER = REPO / "scripts" / "finetune_twist.sh"
TRAIN_LLAVA = Path(__file__).parents[1] / "train" / "train_llava.py"  # what DeepSpeed's launcher runs on CUDA
LLAVA_DS_CONFIG = REPO / "scripts" / "zero2.json"


# ---------------------------------------------------------------- helpers


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


def tensor_numel(path: Path, keep: Any = None) -> int:
    """Parameters stored in a ``.safetensors`` or torch ``.bin`` file (names filtered by ``keep``)."""
    import math

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if keep is None or keep(k))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return sum(t.numel() for k, t in state.items() if keep is None or keep(k))


def checkpoint_weights(folder: Path) -> list[Path]:
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not found:
        raise FileNotFoundError(f"{folder}: no model weights (*.safetensors or pytorch_model*.bin)")
    return found


def language_model_params(folder: Path) -> int:
    """What LLaVA's full fine-tuning trains: every weight of the checkpoint but the (frozen) vision tower."""
    return sum(tensor_numel(p, lambda k: ".vision_tower." not in k) for p in checkpoint_weights(folder))


def vision_tower_of(model_dir: Path) -> str:
    return str(read_json(model_dir / "config.json")["mm_vision_tower"])


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


def is_twist(name: str) -> bool:
    return name.startswith("twist-")


# ---------------------------------------------------------------- model and data


def build_model(ctx: Context) -> dict[str, Any]:
    """The tiny LLaVA-1.5 folder; its vision tower pretrained on the scene world when the recipe says so."""
    ctx.python_module("llava_twist.tiny", "--out", str(ctx.folder), *spec_flags(ctx.recipe.model))
    summary: dict[str, Any] = {"params": sum(tensor_numel(p) for p in checkpoint_weights(ctx.folder))}
    vision = ctx.recipe.vision
    if vision is not None:
        tower = Path(vision_tower_of(ctx.folder))
        ctx.python_module("llava_twist.demo.vision_pretrain", "--tower", str(tower), *spec_flags(vision),
                          *ctx.recipe.base_data.synth_args(ctx.recipe.seed))
        result = read_json(tower / "dense_pretraining.json")
        summary["vision_pretraining"] = {"seconds": result["seconds"], "held_out": result["after"]}
    return summary


def build_data(ctx: Context) -> dict[str, Any]:
    """Base data (understanding + one-shot boxes), the grounding records, each training set (the grounding records
    or the one-shot ones alone, with understanding replay), the held-out sets and each warm-up lesson's records."""
    from scout_data.stats import dataset_stats
    from scout_data.validate import load_records

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
    one_shot = [r for r in load_records(str(grounding["mixed"])) if r.get("kind") == "region"]
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


# ---------------------------------------------------------------- training


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
    from llava_twist.demo.release import install_release

    card = install_release(REPO / str(ctx.recipe.shipped_base), ctx.folder, ctx.recipe.base_hash())
    return {"release": ctx.recipe.shipped_base, "recipe_hash": card["recipe_hash"], "figures": card["figures"],
            "vision_pretraining": card.get("vision_pretraining"), "trainable_params": language_model_params(ctx.folder)}


def grounding_train_args(ctx: Context, out: Path, spec: TrainSpec, extra: list[str] | None = None) -> list[str]:
    """LLaVA's trainer for a grounding baseline: from the base, on the grounding records, with the grounding runs'
    seed and batches grouped by length, as LLaVA's ``finetune.sh``."""
    layout = ctx.layout
    return llava_train_args(ctx, layout.model("base"), training_set(layout, "mixed"), layout.data, out, spec, extra,
                            seed=ctx.recipe.train_seed, grouped=True)


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
    ctx.python_module("llava_twist.demo.merge_lora", "--lora-dir", str(adapter), "--base", str(layout.model("base")),
                      "--out", str(merged))
    trainable = sum(tensor_numel(p) for p in adapter.glob("adapter_model.*"))
    trainable += tensor_numel(adapter / "non_lora_trainables.bin")
    return {**trainer_summary(adapter), "trainable_params": trainable}


def twist_launch(recipe: Recipe, layout: Layout, variant: TwistVariant, out: Path,
                 python: str) -> tuple[Path, dict[str, str], list[str]]:
    """The TWIST launcher a stage runs, its environment and its extra trainer flags: on CPU
    ``scripts/finetune_twist_cpu.sh`` (DeepSpeed, ZeRO-3, ``twist_nproc`` gloo processes, fp32); on CUDA
    ``scripts/finetune_twist.sh``, the launcher users run (ZeRO-3, bf16, one process per GPU)."""
    spec, nproc = recipe.twist, recipe.twist_nproc
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
                   ENTRY="llava_twist/train/train_twist.py")
        extra += ["--max_steps", str(spec.steps)]
        return TWIST_GPU_LAUNCHER, env, extra
    env.update(STEPS=str(spec.steps), NPROC=str(nproc), DEEPSPEED=deepspeed_command(python))
    return TWIST_LAUNCHER, env, extra


def train_twist(ctx: Context) -> dict[str, Any]:
    """TWIST through the DeepSpeed launcher with ZeRO-3 (:func:`twist_launch` says which script and how)."""
    from llava_twist.model.builder import DELTA_WEIGHTS

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
    return {**trainer_summary(ctx.folder), "trainable_params": tensor_numel(delta), "flags": list(variant.flags)}


# ---------------------------------------------------------------- the stage list


def build_stages(recipe: Recipe, base_only: bool = False) -> list[Stage]:
    """Every stage in run order with its folder and the stages it reads from. With a released base the base is
    imported, not trained; ``base_only`` (``make base``): the stages that make and measure the base."""
    from llava_twist.demo.release import release_weights

    def folder(stage: str) -> Callable[[Layout], Path]:
        return lambda lay: stage_model(lay, stage)

    data = Stage("data", lambda lay: lay.data, (), build_data)
    if recipe.shipped_base and not base_only:
        head = [data, Stage("base", folder("base"), (), import_base,
                            code=(release_weights(REPO / recipe.shipped_base),))]
    else:
        warmups = [Stage(w.stage, folder(w.stage), (warmup_start(recipe, w.stage), "data"), train_warmup)
                   for w in recipe.warmups]
        head = [Stage("model", folder("model"), (), build_model), data, *warmups,
                Stage("base", folder("base"), (warmup_start(recipe, "base"), "data"), train_base)]
    if base_only:
        return [*head, Stage("base-eval", lambda lay: lay.eval, ("data", "base"), evaluate_base, clean=False)]
    twist = [Stage(v.stage, folder(v.stage), ("base", "data"), train_twist) for v in recipe.twist_variants]
    trained = ("base", "full-ft", "lora", *(v.stage for v in recipe.twist_variants))
    return [
        *head,
        *twist,
        Stage("full-ft", folder("full-ft"), ("base", "data"), train_full_ft),
        Stage("lora", folder("lora"), ("base", "data"), train_lora),
        Stage("eval", lambda lay: lay.eval, ("data", *trained), evaluate, clean=False,
              code=(Path(__file__).with_name("evaluation.py"), ANSWER_LOSS)),
        Stage("report", lambda lay: lay.work / "report", ("eval", *trained), write_report,
              code=(Path(__file__).with_name("report.py"),)),
    ]

"""The stage bodies of ``make demo``: build, generate, train and evaluate through the project's and LLaVA's
own command lines (subprocesses, the same code paths as on a GPU), each writing into its stage folder."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_twist.demo.chain_misses import chain_misses
from llava_twist.demo.pipeline import (
    GROUNDING_PREFIX,
    UNDERSTANDING_PREFIX,
    Context,
    Layout,
    Stage,
    StageError,
    cpu_count,
    read_json,
    write_json,
)
from llava_twist.demo.recipe import Recipe, TrainSpec, TwistVariant, config_hash
from llava_twist.demo.report import model_dirs, write_report
from llava_twist.model.routes import TASK_ROUTE
from llava_twist.spec_cli import spec_flags
from scout_data.output import atomic_write_text, dumps_records

REPO = Path(__file__).resolve().parents[2]
TWIST_LAUNCHER = REPO / "scripts" / "finetune_twist_cpu.sh"
TWIST_GPU_LAUNCHER = REPO / "scripts" / "finetune_twist.sh"
TRAIN_LLAVA = Path(__file__).parents[1] / "train" / "train_llava.py"  # what DeepSpeed's launcher runs on CUDA
LLAVA_DS_CONFIG = REPO / "scripts" / "zero2.json"
ANSWER_LOSS = Path(__file__).parents[1] / "eval" / "answer_loss.py"
BENCHMARK_FILES = ("refexp", "localization", "vqa", "region")  # region: the base's own one-shot box prompts


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
                     extra: list[str] | None = None) -> list[str]:
    """LLaVA-1.5's own trainer (``llava.train.train``), as its ``finetune.sh`` calls it (fp32 on CPU; bf16 under
    DeepSpeed ZeRO-2 on CUDA), seeded before the model is built (``llava_twist.train.train_llava``: LoRA's adapters
    start the same in every run)."""
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
        "--group_by_modality_length", "False",
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
        "--seed", str(recipe.seed),
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
    """Base data (understanding + one-shot boxes), grounding chains (train/test), the replay mix, and the
    records of each warm-up lesson."""
    from scout_data.stats import dataset_stats
    from scout_data.validate import load_records

    recipe, data = ctx.recipe, ctx.folder
    lessons = () if recipe.shipped_base else recipe.warmups  # a released base has had its lessons
    sets = [("base", recipe.base_data), ("grounding", recipe.grounding_data), *((w.stage, w.data) for w in lessons)]
    for name, spec in sets:
        ctx.python_module("scout_data", "synth", "--out", str(data / name), "--quiet", *spec.synth_args(recipe.seed),
                          threads=1)
    base_train = load_records(str(data / "base" / "train.json"))
    replay = [r for r in base_train if r.get("task") == "understanding"]
    if not replay:
        raise StageError(ctx.stage, "the base data has no understanding records to replay", ctx.log)
    atomic_write_text(str(data / "replay.json"), dumps_records(replay))
    ctx.python_module(
        "scout_data", "mix", "--scout", str(data / "grounding" / "train.json"), "--replay", str(data / "replay.json"),
        "--out", str(data / "mixed.json"), "--ratio", f"{recipe.replay_ratio:g}", "--seed", str(recipe.seed),
        "--scout-image-prefix", "grounding/images", "--replay-image-prefix", "base/images", "--overwrite",
        threads=1,
    )
    files = ["base/train.json", "base/test.json", "grounding/train.json", "grounding/test.json", "mixed.json",
             *(f"{w.stage}/train.json" for w in lessons)]
    stats = {name: dataset_stats(load_records(str(data / name))) for name in files}
    write_json(data / "stats.json", stats)
    return {name: {"records": s["records"], "task": s["task"], "difficulty": s["difficulty"]}
            for name, s in stats.items()}


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


def train_full_ft(ctx: Context) -> dict[str, Any]:
    """LLaVA's full fine-tuning of the base on the grounding mix (the forgetting baseline)."""
    layout = ctx.layout
    ctx.run(llava_train_args(ctx, layout.model("base"), layout.data / "mixed.json", layout.data, ctx.folder,
                             ctx.recipe.full_ft))
    return {**trainer_summary(ctx.folder), "trainable_params": language_model_params(ctx.folder)}


def train_lora(ctx: Context) -> dict[str, Any]:
    """LLaVA's own LoRA path on the grounding mix, then merged with LLaVA's loader into a plain checkpoint."""
    recipe, layout = ctx.recipe, ctx.layout
    adapter, merged = ctx.folder / "adapter", ctx.folder / "merged"
    extra = ["--lora_enable", "True", "--lora_r", str(recipe.lora_r), "--lora_alpha", str(recipe.lora_alpha),
             "--mm_projector_lr", f"{recipe.lora_mm_projector_lr:g}"]
    ctx.run(llava_train_args(ctx, layout.model("base"), layout.data / "mixed.json", layout.data, adapter,
                             recipe.lora, extra))
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
        "DATA": str(layout.data / "mixed.json"),
        "IMAGES": str(layout.data),
        "OUT": str(out),
        "BATCH": str(spec.batch // nproc),
        "LR": f"{spec.lr:g}",
        "SAVE_STEPS": str(spec.steps + 1),
    }
    extra = [*recipe.twist_flags, *variant.flags, "--model_max_length", str(recipe.model_max_length),
             "--gradient_checkpointing", "False", "--dataloader_num_workers", loader_workers(recipe),
             "--warmup_ratio", f"{spec.warmup_ratio:g}", "--lr_scheduler_type", spec.scheduler,
             "--seed", str(recipe.seed)]
    if recipe.device == "cuda":
        env.update(GPUS=str(nproc), VISION_TOWER=vision_tower_of(base), REPORT_TO="none",
                   ENTRY="llava_twist/train/train_twist.py")
        extra += ["--max_steps", str(spec.steps), "--group_by_modality_length", "False"]
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


# ---------------------------------------------------------------- evaluation


def _records_by_id(path: Path) -> dict[str, dict[str, Any]]:
    return {str(r["id"]): r for r in json.loads(path.read_text(encoding="utf-8"))}


def build_questions(layout: Layout, limit: int) -> dict[str, list[dict[str, Any]]]:
    """Held-out question files (``llava_twist.eval.scout_questions``), merged into one set (``all.jsonl``) whose
    ids and image paths are unique under ``work/data``; each line also carries ``task`` and ``difficulty``. The
    base's own one-shot box prompts (``region``) are kept apart: only the base answers them."""
    from llava_twist.eval.scout_questions import convert

    qdir = layout.eval / "questions"
    shutil.rmtree(qdir, ignore_errors=True)
    sources = (("grounding", GROUNDING_PREFIX, {"refexp": "refexp", "localization": "localization"}),
               ("base", UNDERSTANDING_PREFIX, {"vqa": "vqa", "refexp": "region"}))
    out: dict[str, list[dict[str, Any]]] = {b: [] for b in BENCHMARK_FILES}
    for folder, prefix, benchmarks in sources:
        test = layout.data / folder / "test.json"
        raw = qdir / folder
        convert(str(test), str(raw), limit)
        records = _records_by_id(test)
        for source, bench in benchmarks.items():
            path = raw / f"{source}.jsonl"
            if not path.is_file():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                q = json.loads(line)
                rec = records[str(q["question_id"])]
                q.update(question_id=prefix + str(q["question_id"]), image=f"{folder}/images/{q['image']}",
                         task=rec.get("task"), difficulty=rec.get("difficulty"))
                out[bench].append(q)
    for bench, rows in out.items():
        atomic_write_text(str(qdir / f"{bench}.jsonl"), "".join(json.dumps(q) + "\n" for q in rows))
    ordered = out["vqa"] + out["refexp"] + out["localization"]
    atomic_write_text(str(qdir / "all.jsonl"), "".join(json.dumps(q) + "\n" for q in ordered))
    return out


def model_args(ctx: Context, name: str) -> list[str]:
    """How the eval tools load an evaluated model: TWIST as a delta on the base, route auto; else plain LLaVA."""
    if is_twist(name):
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


def answer_questions(ctx: Context, name: str, model_dir: Path, questions_file: Path, out: Path,
                     prompt: str = "scout") -> bool:
    """``llava_twist.eval.model_grounding`` for one model (``prompt``: how refexp questions are asked); cached on
    the model's stamp and the questions. Returns whether it ran."""
    from llava_twist.serve.inference import DEFAULT_CONV_MODE

    layout, spec = ctx.layout, ctx.recipe.eval
    answers = out / "answers.jsonl"
    key = {"model": ctx.stamps[name]["id"], "questions": questions_file.read_text(),
           "eval": [spec.max_new_tokens, spec.batch_size], "conv_mode": DEFAULT_CONV_MODE, "prompt": prompt}
    return run_cached(ctx, answers, key, "llava_twist.eval.model_grounding", [
        "--model-path", str(model_dir),
        "--model-id", name,
        "--question-file", str(questions_file),
        "--image-folder", str(layout.data),
        "--answers-file", str(answers),
        "--batch-size", str(spec.batch_size),
        "--max_new_tokens", str(spec.max_new_tokens),
        "--conv-mode", DEFAULT_CONV_MODE,
        "--temperature", "0",
        "--device", ctx.recipe.device,
        "--prompt", prompt,
        "--overwrite",
        *model_args(ctx, name),
    ])


def chain_loss(ctx: Context, name: str, model_dir: Path, out: Path) -> dict[str, Any]:
    """``llava_twist.eval.answer_loss`` on the held-out chains: where the model's loss sits, per box-coordinate
    token and per text token; cached like the answers."""
    layout, limit = ctx.layout, ctx.recipe.eval.limit
    chains, result = layout.data / "grounding" / "test.json", out / "answer_loss.json"
    key = {"model": ctx.stamps[name]["id"], "data": chains.read_text(), "num": limit,
           "code": config_hash(ANSWER_LOSS.read_text(encoding="utf-8"))}
    run_cached(ctx, result, key, "llava_twist.eval.answer_loss", [
        "--model-path", str(model_dir), "--data", str(chains),
        "--image-folder", str(layout.data / "grounding" / "images"),
        "--num", str(limit), "--device", ctx.recipe.device, "--out", str(result), *model_args(ctx, name)])
    return read_json(result)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def refexp_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a ``score_refexp`` result."""
    return {**{k: result["metrics"][k] for k in ("acc@0.5", "mean_iou", "parse_failure_rate")}, "n": result["n"]}


def understanding(vqa: list[dict[str, Any]], by_id: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy of short answers to held-out understanding questions."""
    from llava_twist.eval.eval_retention import is_correct

    correct = [is_correct(str(by_id.get(q["question_id"], {}).get("text", "")), q.get("answer", "")) for q in vqa]
    by_type: dict[str, list[float]] = {}
    for q, c in zip(vqa, correct, strict=True):
        by_type.setdefault(q.get("question_type") or "other", []).append(float(c))
    return {"n": len(vqa), "accuracy": _mean([float(c) for c in correct]),
            "by_type": {t: {"n": len(v), "accuracy": _mean(v)} for t, v in sorted(by_type.items())}}


def refexp_metrics(questions: list[dict[str, Any]], answers: list[dict[str, Any]], result_file: Path,
                   title: str) -> dict[str, Any]:
    """Acc@0.5 and mean IoU of referring-expression answers, over all and for simple and hard queries apart, with
    each question's IoU; the scorer's result JSON goes to ``result_file``."""
    from llava_twist.eval.common import write_result
    from llava_twist.eval.eval_refexp import score_refexp

    result = score_refexp(questions, answers)
    rows = result.pop("rows")
    write_result(result_file, {**result, "name": title})
    metrics = refexp_summary(result)
    difficulty = {q["question_id"]: q.get("difficulty") or "simple" for q in questions}
    for level in ("simple", "hard"):
        sub = [r for r in rows if difficulty.get(r["question_id"]) == level]
        metrics[level] = {"n": len(sub), "acc@0.5": _mean([float(r["correct"]) for r in sub]),
                          "mean_iou": _mean([r["iou"] for r in sub])}
    metrics["predictions"] = {r["question_id"]: {"iou": r["iou"], "correct": r["correct"]} for r in rows}
    return metrics


def score_model(name: str, questions: dict[str, list[dict[str, Any]]], answers: list[dict[str, Any]],
                base_answers: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Every metric of one model, from the project's scorers; their result JSONs go to ``out``."""
    from llava_twist.eval.common import answers_by_id, write_result
    from llava_twist.eval.eval_localization import score_localization
    from llava_twist.eval.eval_retention import score_retention

    metrics: dict[str, Any] = {"model": name}
    if questions["refexp"]:
        metrics["refexp"] = refexp_metrics(questions["refexp"], answers, out / "refexp.result.json",
                                           f"{name} scout-refexp")
    if questions["localization"]:
        result = score_localization(questions["localization"], answers)
        write_result(out / "localization.result.json", {**result, "name": f"{name} scout-localization"})
        metrics["localization"] = {"n": result["n"], **{k: result["metrics"][k] for k in (
            "recall@0.5", "precision@0.5", "AP50", "count_accuracy", "parse_failure_rate")}}
    vqa = questions["vqa"]
    by_id = answers_by_id(answers)
    if vqa:
        metrics["understanding"] = understanding(vqa, by_id)
        if name != "base":
            result = score_retention(vqa, base_answers, answers)
            write_result(out / "retention.result.json", {**result, "name": f"{name} scout-vqa"})
            m = result["metrics"]
            metrics["retention"] = {k: m[k] for k in ("identical_rate", "identical_rate_frozen_route",
                                                     "frozen_route_rate")}
            metrics["retention"]["routes"] = result["routes"]
    if is_twist(name):
        metrics["router"] = router_metrics(questions, by_id)
    return metrics


def router_metrics(questions: dict[str, list[dict[str, Any]]], by_id: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The route TWIST chose (auto) on every held-out prompt against its task: grounding prompts should take
    the grounding route, understanding prompts the frozen one."""
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    probs: dict[str, list[float]] = {"grounding": [], "understanding": []}
    for rows in questions.values():
        for q in rows:
            meta = (by_id.get(q["question_id"]) or {}).get("metadata") or {}
            task = q.get("task") or "grounding"
            total[task] += 1
            right[task] += meta.get("route") == TASK_ROUTE[task]
            if isinstance(meta.get("router_prob"), int | float):
                probs[task].append(float(meta["router_prob"]))
    n = sum(total.values())
    return {
        "n": n,
        "accuracy": sum(right.values()) / n if n else None,
        "by_task": {t: {"n": total[t], "accuracy": right[t] / total[t] if total[t] else None,
                        "mean_prob": _mean(probs[t])} for t in TASK_ROUTE},
    }


def base_one_shot(ctx: Context, model_dir: Path, questions: dict[str, list[dict[str, Any]]],
                  out: Path, scenes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The base asked one-shot with LLaVA-1.5's REC prompt ("Please provide the bounding box coordinate of the
    region this sentence describes: ..."), the prompt its box data trains: on its own held-out region prompts
    (``region``) and on the held-out referring expressions the grounding runs are scored on (``refexp``; given
    ``scenes``, also where its boxes land among their objects)."""
    from llava_twist.eval.common import read_jsonl

    qdir = ctx.layout.eval / "questions"
    result: dict[str, Any] = {}
    for bench, prompt in (("region", "scout"), ("refexp", "llava")):
        if not questions[bench]:
            continue
        folder = out / bench
        answer_questions(ctx, "base", model_dir, qdir / f"{bench}.jsonl", folder, prompt=prompt)
        answers = read_jsonl(str(folder / "answers.jsonl"), "answers")
        result[bench] = refexp_metrics(questions[bench], answers, folder / "refexp.result.json",
                                       f"base one-shot {bench}")
        if bench == "refexp" and scenes is not None:
            result[bench]["misses"] = chain_misses(questions[bench], answers, scenes)
    return result


def image_reliance(ctx: Context, model_dir: Path, out: Path) -> dict[str, Any]:
    """The base's loss on its training records with their own images and with the images shuffled."""
    layout = ctx.layout
    ctx.python_module("llava_twist.demo.image_reliance", "--model-path", str(model_dir),
                      "--data", str(layout.data / "base" / "train.json"),
                      "--image-folder", str(layout.data / "base" / "images"), "--out", str(out))
    return read_json(out)


def evaluate(ctx: Context) -> dict[str, Any]:
    """Answer the held-out questions with every model and score them (``work/eval/metrics.json``)."""
    from llava_twist.eval.common import read_jsonl

    recipe, layout = ctx.recipe, ctx.layout
    questions = build_questions(layout, recipe.eval.limit)
    asked = {k: v for k, v in questions.items() if k != "region"}
    all_file = layout.eval / "questions" / "all.jsonl"
    dirs = model_dirs(recipe, layout)
    ran = {}
    for name, model_dir in dirs.items():
        ran[name] = answer_questions(ctx, name, model_dir, all_file, layout.eval / "models" / name)
        ctx.note(f"# {name}: {'answered' if ran[name] else 'answers cached'}")
    answers = {name: read_jsonl(str(layout.eval / "models" / name / "answers.jsonl"), "answers") for name in dirs}
    models = {name: score_model(name, asked, answers[name], answers["base"], layout.eval / "models" / name)
              for name in dirs}
    for name, model_dir in dirs.items():
        models[name]["chain_loss"] = chain_loss(ctx, name, model_dir, layout.eval / "models" / name)
    scenes = {GROUNDING_PREFIX + k: r for k, r in _records_by_id(layout.data / "grounding" / "test.json").items()}
    for name in dirs:
        models[name]["misses"] = chain_misses(asked["refexp"], answers[name], scenes)
    one_shot = base_one_shot(ctx, dirs["base"], questions, layout.eval / "base_one_shot", scenes)
    for found in one_shot.values():
        found.pop("predictions", None)
    if "refexp" in one_shot:
        models["base"]["one_shot"] = one_shot["refexp"]
    counts = {b: len(rows) for b, rows in asked.items()}
    write_json(layout.eval / "metrics.json", {
        "questions": counts, "models": models, "base_one_shot": one_shot,
        "image_reliance": image_reliance(ctx, dirs["base"], layout.eval / "image_reliance.json")})
    return {"questions": counts, "answered": ran}


def evaluate_base(ctx: Context) -> dict[str, Any]:
    """The figures of a base's card (``make base``): held-out understanding, one-shot Acc@0.5 on simple and hard
    queries, and how much the base uses the image."""
    from llava_twist.eval.common import answers_by_id, read_jsonl

    layout = ctx.layout
    base = layout.model("base")
    questions = build_questions(layout, ctx.recipe.base_eval_limit)
    vqa = questions["vqa"]
    answers_file = ctx.folder / "vqa" / "answers.jsonl"
    answer_questions(ctx, "base", base, layout.eval / "questions" / "vqa.jsonl", answers_file.parent)
    by_id = answers_by_id(read_jsonl(str(answers_file), "answers"))
    one_shot = base_one_shot(ctx, base, questions, ctx.folder / "one_shot")
    for found in one_shot.values():
        found.pop("predictions", None)
    figures = {
        "understanding": understanding(vqa, by_id),
        "one_shot": one_shot,
        "image_reliance": image_reliance(ctx, base, ctx.folder / "image_reliance.json"),
    }
    write_json(ctx.folder / "figures.json", figures)
    return figures


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
              code=(Path(__file__), ANSWER_LOSS)),
        Stage("report", lambda lay: lay.work / "report", ("eval", *trained), write_report,
              code=(Path(__file__).with_name("report.py"),)),
    ]

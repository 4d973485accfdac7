"""Two bf16 ZeRO-3 TWIST training steps on one GPU, on a LLaVA-1.5-7B-shaped model with random weights, and the
planner's prediction for the same run beside the measured peak (``torch.cuda.max_memory_allocated``).

Run by ``scripts/gpu_check.sh`` under DeepSpeed's launcher (one process):

    deepspeed --num_gpus 1 scripts/gpu_zero3_step.py --out DIR [--layers auto] [--batch 4 --length 1024]

The model has liuhaotian/llava-v1.5-7b's config with ``--layers`` decoder layers (``auto``: the most of 32, 24, 16,
... that the planner says fit in 80% of the GPU's free memory), written to DIR. It is built as training builds it
(``deepspeed.zero.Init``, frozen as training freezes it, non-reentrant gradient checkpointing) through the planner's
own builder; the batch is text only, every sample on the grounding route (the planner's assumption: both experts
run on every sample). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import deepspeed
import torch

from llava_twist.model.builder import twist_config_for
from llava_twist.plan import build_twist_model, make_plan, parse_args, vision_tower_config
from llava_twist.train.zero3 import ZERO3, hidden_size_autos

# liuhaotian/llava-v1.5-7b's config.json (the fields that matter), without its layer count
LLAVA_V15_7B = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu",
                "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
                "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False, "pretraining_tp": 1, "image_aspect_ratio": "pad", "mm_hidden_size": 1024,
                "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
                "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "use_mm_proj": True,
                "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
LAYER_CHOICES = (32, 24, 16, 12, 8, 6, 4, 2)


def write_config(out: Path, layers: int) -> Path:
    folder = out / f"llava-7b-{layers}-layers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**LLAVA_V15_7B, "num_hidden_layers": layers}, indent=2))
    return folder / "config.json"


def plan_for(config: Path, args: argparse.Namespace) -> dict:
    return make_plan(parse_args(["--model-path", str(config), "--gpus", "1", "--batch-per-gpu", str(args.batch),
                                 "--max-length", str(args.length), "--twist_expert", args.twist_expert,
                                 "--twist_layers", args.twist_layers, "--zero3", args.deepspeed]))


def fitting_plan(args: argparse.Namespace, free: int) -> tuple[Path, dict]:
    """The config and plan of ``--layers``, or (``auto``) of the most layers planned to fit in 80% of ``free``."""
    choices = LAYER_CHOICES if args.layers == "auto" else (int(args.layers),)
    for layers in choices:
        config = write_config(Path(args.out), layers)
        plan = plan_for(config, args)
        if args.layers != "auto" or plan["per_gpu_bytes"]["total"] <= 0.8 * free:
            return config, plan
    raise SystemExit(f"not even {choices[-1]} layers are planned to fit in 80% of {free / 2**30:.1f} GiB")


def deepspeed_config(path: Path, hidden: int, batch: int) -> dict:
    """The config as HF's Trainer fills it for ``--bf16 True`` and this batch."""
    config = json.loads(path.read_text())
    config.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1, train_batch_size=batch,
                  gradient_clipping=1.0, steps_per_print=10**9)
    config["fp16"] = {"enabled": False}
    config["bf16"] = {"enabled": True}
    zero = config["zero_optimization"]
    for key, value in hidden_size_autos(hidden).items():
        if zero.get(key) == "auto":
            zero[key] = value
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    return config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the model's config.json")
    p.add_argument("--layers", default="auto", help="decoder layers, or auto")
    p.add_argument("--twist_expert", default="mlp")
    p.add_argument("--twist_layers", default="every_other")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--deepspeed", default=str(ZERO3))
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (no peak is measured)")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()

    cuda = args.device == "cuda"
    free = torch.cuda.mem_get_info()[0] if cuda else 2**40
    config_path, plan = fitting_plan(args, free)
    deepspeed.init_distributed(dist_backend=None if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(0)
    torch.manual_seed(0)
    config = twist_config_for(config_path.parent, twist_expert=args.twist_expert,
                              twist_layers=plan["twist"]["layers"])
    ds_config = deepspeed_config(Path(args.deepspeed), config.hidden_size, args.batch)
    tower = vision_tower_config(config.mm_vision_tower, config.mm_hidden_size)
    start = time.perf_counter()
    init = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.bfloat16)
    model = build_twist_model(config, tower, init=init)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                      optimizer=torch.optim.AdamW(params, lr=1e-5))
    ids = torch.randint(3, config.vocab_size, (args.batch, args.length), device=args.device)
    grounding = torch.ones(args.batch, dtype=torch.bool, device=args.device)
    losses = []
    for _ in range(2):
        out = engine(input_ids=ids, labels=ids, twist_route=grounding, twist_router_labels=grounding.float())
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
    predicted = plan["per_gpu_bytes"]
    measured = torch.cuda.max_memory_allocated() if cuda else 0
    print(json.dumps({
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "free_gib": round(free / 2**30, 2),
        "twist_expert": args.twist_expert, "twist_layers": args.twist_layers, "batch": args.batch,
        "length": args.length, "losses": losses,
        "seconds": round(time.perf_counter() - start, 1),
        "measured_peak_gib": round(measured / 2**30, 2),
        "planned_total_gib": round(predicted["total"] / 2**30, 2),
        "planned_model_states_gib": round((predicted["trainable_states"] + predicted["frozen_shards"]
                                           + predicted["gathered"]) / 2**30, 2),
        "planned_activations_gib": round(predicted["activations"] / 2**30, 2),
        "planned_buffers_gib": round(predicted["buffers"] / 2**30, 2),
        "measured_over_planned": round(measured / predicted["total"], 3),
    }))


if __name__ == "__main__":
    main()

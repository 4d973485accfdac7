"""Training cost of TWIST against full fine-tuning and LoRA, on CPU, same model and batch.

For a tiny-ish LLaVA-1.5 (default hidden 256, 4 layers) built locally: trainable parameters (and fraction),
AdamW state memory (bytes of exp_avg + exp_avg_sq after a step) and step time (forward + backward +
optimizer step, median), each with its ratio to full fine-tuning measured in the same run.

    python scripts/bench_train.py [--hidden 256 --layers 4 --batch 4 --steps 8 --threads 2]
    python scripts/bench_train.py --demo-step [--steps 40]

``--demo-step``: the demo's own steps. The demo's own stages (``playground.miniature``: its data, the released base,
its TWIST run through the ZeRO-3 launcher and its full fine-tuning through LLaVA's trainer, ``--steps`` steps
each) give the trainer step (``train_runtime / steps``); the bare step (forward + backward + AdamW of the same
model, one process, on batches of the demo's data collated in advance) is measured in the same run, and the
ratio trainer step / bare step says what each trainer spends on anything but compute (data loading, image
preprocessing, tokenization, logging, DeepSpeed's partitioning and processes). The data's per-batch cost is
measured apart.

Full fine-tuning trains the language model and projector (LLaVA's finetune.sh; the vision tower stays
frozen); LoRA (peft) adapts q/k/v/o/gate/up/down of the language model plus the projector (LLaVA's
finetune_lora.sh; r scaled from LLaVA's 128 at hidden 4096); TWIST trains the grounding experts, mixes
and router only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.conversation import conv_templates  # noqa: E402
from llava.mm_utils import tokenizer_image_token  # noqa: E402

from llava_twist.model.builder import convert_llava_to_twist, freeze_all_but_twist  # noqa: E402
from llava_twist.tiny import TinyLlavaSpec, build_tiny_llava  # noqa: E402
from llava_twist.train.lora import add_twist_lora, freeze_for_twist_lora  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANSWER = ("Step 1: The question asks for the red circle left of the blue square.\n"
          "Step 2: I see these candidates: red circle [0.10, 0.15, 0.30, 0.35], red circle [0.55, 0.20, 0.80, 0.45].\n"
          "Answer: [0.10, 0.15, 0.30, 0.35]")


def make_batch(path: Path, batch: int, image_size: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=False)
    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhere is the red circle left of the blue square? Answer step by step.")
    conv.append_message(conv.roles[1], ANSWER)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    input_ids = ids.repeat(batch, 1)
    labels = input_ids.clone()
    labels[:, : int((ids == IMAGE_TOKEN_INDEX).nonzero()[0]) + 20] = IGNORE_INDEX
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids, dtype=torch.bool),
        "labels": labels,
        "images": torch.randn(batch, 3, image_size, image_size, generator=gen),
    }


def llava(path: Path) -> nn.Module:
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    model.get_vision_tower().load_model()
    return model


def full(path: Path) -> nn.Module:
    model = llava(path)
    for name, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    return model


def lora(path: Path, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = llava(path)
    model.requires_grad_(False)
    targets = r"model\.layers\.\d+\..*(" + "|".join(LORA_TARGETS) + ")"
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "mm_projector" in name:
            p.requires_grad_(True)
    return model


def twist(path: Path, lora_r: int = 0, **kwargs) -> nn.Module:
    model = convert_llava_to_twist(path, **kwargs)
    model.get_vision_tower().load_model()
    if lora_r:
        add_twist_lora(model, lora_r, 2 * lora_r, 0.05)
        freeze_for_twist_lora(model)
    else:
        freeze_all_but_twist(model)
    return model


class Run:
    """One variant: its model, AdamW over its trainable parameters, and its step times."""

    def __init__(self, model: nn.Module, batch: dict, is_twist: bool) -> None:
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.batch = dict(batch)
        if is_twist:
            route = torch.arange(batch["input_ids"].shape[0]) % 2 == 0  # half grounding, half understanding
            self.batch.update(twist_route=route, twist_router_labels=route.float())
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        self.model(**self.batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self.times.append(time.perf_counter() - start)

    def result(self) -> dict[str, float]:
        state_bytes = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for k, t in s.items()
                          if isinstance(t, torch.Tensor) and k != "step")
        trainable = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "fraction": trainable / total, "state_bytes": state_bytes,
                "step_s": statistics.median(self.times)}


def bare_steps(model: nn.Module, batches: list[dict], lr: float, twist: bool) -> float:
    """Median seconds of forward + backward + AdamW over ``batches`` (the first two are warm-up)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    times = []
    for k, batch in enumerate(batches):
        batch = dict(batch)
        batch.pop("image_sizes", None)
        if twist:  # what TwistTrainer.compute_loss passes
            batch.pop("twist_step_ids", None)
        else:
            batch = {k: v for k, v in batch.items() if not k.startswith("twist_")}
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def demo_step(args: argparse.Namespace) -> None:
    """Trainer step / bare step for the demo's full fine-tuning and TWIST runs (see the module's docstring)."""
    import dataclasses

    import transformers
    from llava.train.train import DataArguments

    from llava_twist.train.arguments import TwistArguments
    from llava_twist.train.data import TwistDataCollator, TwistSupervisedDataset
    from llava_twist.train.records import validated_records
    from llava_twist.train.train_twist import set_conversation_template
    from playground.miniature.recipe import get_recipe
    from playground.miniature.runner import Layout, read_json, run_stage
    from playground.miniature.stages import build_stages

    recipe = get_recipe("full")
    recipe = dataclasses.replace(recipe, threads=args.threads,
                                 twist=dataclasses.replace(recipe.twist, steps=args.steps),
                                 full_ft=dataclasses.replace(recipe.full_ft, steps=args.steps))
    variant = recipe.twist_variants[0]
    stages = {s.name: s for s in build_stages(recipe)}
    with tempfile.TemporaryDirectory() as tmp:
        layout, stamps = Layout(Path(tmp)), {}
        for name in ("data", "base", variant.stage, "full-ft"):  # the demo's own stage bodies
            print(f"running the demo's stage {name} ({args.steps} steps)", file=sys.stderr, flush=True)
            stamps[name] = run_stage(stages[name], recipe, layout, stamps).stamp
        base, data = layout.model("base"), layout.data

        def trainer_step(stage: str) -> float:
            state = read_json(layout.model(stage) / "trainer_state.json")
            return next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e) / args.steps

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base), use_fast=False,
                                                               model_max_length=recipe.model_max_length)
        set_conversation_template("v1", tokenizer)
        twist_args = transformers.HfArgumentParser(TwistArguments).parse_args_into_dataclasses(
            args=[*recipe.twist_flags, *variant.flags], return_remaining_strings=True)[0]
        twist_model = twist(base, **twist_args.config_kwargs())
        twist_model.config.use_cache = False
        data_args = DataArguments(data_path=str(data / "mixed.json"), lazy_preprocess=True, is_multimodal=True,
                                  image_folder=str(data), image_aspect_ratio="pad")
        data_args.image_processor = twist_model.get_vision_tower().image_processor
        data_args.mm_use_im_start_end = False
        dataset = TwistSupervisedDataset(validated_records(data_args.data_path, str(data)), tokenizer, data_args)
        collate = TwistDataCollator(tokenizer=tokenizer)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
        start = time.perf_counter()
        size = recipe.twist.batch  # the global batch; the full-FT run's is the same
        batches = [collate([dataset[i] for i in order[k * size:(k + 1) * size]]) for k in range(args.steps)]
        data_s = (time.perf_counter() - start) / args.steps
        twist_bare = bare_steps(twist_model, batches, recipe.twist.lr, twist=True)
        del twist_model
        full_bare = bare_steps(full(base), batches, recipe.full_ft.lr, twist=False)
        rows = [("full fine-tuning (LLaVA's trainer)", trainer_step("full-ft"), full_bare),
                (f"TWIST {variant.name} (ZeRO-3 launcher, {recipe.twist_nproc} processes)",
                 trainer_step(variant.stage), twist_bare)]
        lengths = [float(b["attention_mask"].sum(1).float().mean()) for b in batches]
        padded = [b["input_ids"].shape[1] for b in batches]

    print(f"the demo's steps: released base ({recipe.shipped_base}), batch {size} of the demo's mixed data "
          f"(chains + understanding replay), {args.threads} CPU threads in all, {args.steps} steps")
    print(f"text tokens per record: mean {statistics.mean(lengths):.0f}, padded to {statistics.mean(padded):.0f} "
          f"(+{(recipe.model.image_size // recipe.model.patch_size) ** 2} image tokens); dataset + collator: "
          f"{1000 * data_s:.1f} ms a batch")
    print(f"{'run':52s} {'trainer ms':>10s} {'bare ms':>8s} {'trainer / bare':>15s}")
    for name, trainer_s, bare_s in rows:
        print(f"{name:52s} {1000 * trainer_s:10.1f} {1000 * bare_s:8.1f} {trainer_s / bare_s:14.2f}x")
    print(f"TWIST trainer step / full fine-tuning trainer step: {rows[1][1] / rows[0][1]:.2f}x; target for trainer / "
          "bare: <= 1.30x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora_r", type=int, default=0, help="default: 128 * hidden / 4096 (LLaVA's ratio), min 4")
    parser.add_argument("--demo-step", action="store_true",
                        help="the demo's own model, data and batch: LLaVA's trainer step against the bare step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.demo_step:
        demo_step(args)
        return
    r = args.lora_r or max(4, 128 * args.hidden // 4096)

    with tempfile.TemporaryDirectory() as tmp:
        spec = TinyLlavaSpec(hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads)
        path = build_tiny_llava(Path(tmp) / "llava", spec)
        batch = make_batch(path, args.batch, spec.image_size)
        variants: list[tuple[str, Callable[[], nn.Module], bool]] = [
            ("full fine-tuning", lambda: full(path), False),
            (f"LoRA r={r} (LLM linears + projector)", lambda: lora(path, r), False),
            ("TWIST mlp every_other (default)", lambda: twist(path), True),
            ("TWIST mlp all, a=0", lambda: twist(path, twist_layers="all", twist_mix="fixed", twist_mix_init=0.0),
             True),
            ("TWIST layer every_other", lambda: twist(path, twist_expert="layer"), True),
            (f"TWIST mlp every_other, LoRA r={r}", lambda: twist(path, lora_r=r), True),
        ]
        runs = []
        for _, build, is_twist in variants:
            torch.manual_seed(0)
            runs.append(Run(build(), batch, is_twist))
        for i in range(args.steps + 2):  # round robin, so load changes on the machine hit every variant alike
            for run in runs:
                run.step(timed=i >= 2)
        rows = [(name, run.result()) for (name, _, _), run in zip(variants, runs, strict=True)]

    ref = rows[0][1]
    print(f"model: hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {batch['input_ids'].shape[1]} "
          f"tokens (+{(spec.image_size // spec.patch_size) ** 2} image tokens), {args.threads} CPU threads, "
          f"median of {args.steps} round-robin steps")
    header = f"{'variant':40s} {'trainable':>10s} {'frac':>7s} {'x full':>7s} {'AdamW MiB':>10s} {'x full':>7s} " \
             f"{'step ms':>8s} {'x full':>7s}"
    print(header)
    print("-" * len(header))
    for name, m in rows:
        print(f"{name:40s} {m['trainable']:10,d} {m['fraction']:7.2%} {m['trainable'] / ref['trainable']:7.3f} "
              f"{m['state_bytes'] / 2**20:10.2f} {m['state_bytes'] / ref['state_bytes']:7.3f} "
              f"{1000 * m['step_s']:8.1f} {m['step_s'] / ref['step_s']:7.2f}")


if __name__ == "__main__":
    main()

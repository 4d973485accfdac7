"""Training cost of TWIST against full fine-tuning and LoRA, on CPU, same model and batch.

For a tiny-ish LLaVA-1.5 (default hidden 256, 4 layers) built locally: trainable parameters (and fraction),
AdamW state memory (bytes of exp_avg + exp_avg_sq after a step) and step time (forward + backward +
optimizer step, median), each with its ratio to full fine-tuning measured in the same run.

    python scripts/bench_train.py [--hidden 256 --layers 4 --batch 4 --steps 8 --threads 2]
    python scripts/bench_train.py --demo-step [--batch 32 --steps 40]

``--demo-step``: the demo's own step. LLaVA's trainer (``llava.train.train``, as the demo calls it) runs full
fine-tuning of the released base on the demo's chains; the bare step (forward + backward + AdamW of the same
model on batches collated in advance by LLaVA's own dataset and collator) is measured in the same run, and the
ratio trainer step / bare step says what the trainer spends on anything but compute (data loading, image
preprocessing, tokenization, logging). The data's per-batch cost is measured apart.

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


def demo_data(root: Path, records: int) -> tuple[Path, Path]:
    """``records`` training chains of the demo's recipe (``scout_data synth``), and their image folder."""
    import subprocess

    from llava_twist.demo.recipe import get_recipe

    spec = get_recipe("full").grounding_data
    args = spec.synth_args(0)
    args[args.index("--num") + 1] = str(records)
    args[args.index("--splits") + 1] = "train:1"
    subprocess.run([sys.executable, "-m", "scout_data", "synth", "--out", str(root), "--quiet", *args], check=True)
    return root / "train.json", root / "images"


def demo_step(args: argparse.Namespace) -> None:
    """Trainer step / bare step for the demo's model, data, batch and padding (see the module's docstring)."""
    import dataclasses
    import json
    import subprocess

    import transformers
    from llava import conversation as conversation_lib
    from llava.train.train import DataArguments, make_supervised_data_module

    from llava_twist.demo.pipeline import Context, Layout
    from llava_twist.demo.recipe import SHIPPED_BASE, TrainSpec, get_recipe
    from llava_twist.demo.release import install_release
    from llava_twist.demo.stages import llava_train_args

    recipe = dataclasses.replace(get_recipe("full"), threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "base"
        install_release(Path(__file__).resolve().parents[1] / SHIPPED_BASE, base, recipe.base_hash())
        data, images = demo_data(root / "data", max(args.batch * (args.steps + 4), 256))

        ctx = Context(recipe, Layout(root), "bench", root, {}, python=sys.executable)
        spec = TrainSpec(steps=args.steps, batch=args.batch, lr=1e-3)
        cmd = llava_train_args(ctx, base, data, images, root / "trained", spec)
        env = {**ctx.env(args.threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run(cmd, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = json.loads((root / "trained" / "trainer_state.json").read_text())
        trainer_s = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e) / args.steps

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base), use_fast=False,
                                                               model_max_length=recipe.model_max_length)
        model = full(base)
        conversation_lib.default_conversation = conversation_lib.conv_templates["v1"]
        data_args = DataArguments(data_path=str(data), lazy_preprocess=True, is_multimodal=True,
                                  image_folder=str(images), image_aspect_ratio="pad")
        data_args.image_processor = model.get_vision_tower().image_processor
        data_args.mm_use_im_start_end = False
        module = make_supervised_data_module(tokenizer, data_args)
        dataset, collate = module["train_dataset"], module["data_collator"]
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
        start = time.perf_counter()
        batches = [collate([dataset[i] for i in order[k * args.batch:(k + 1) * args.batch]])
                   for k in range(args.steps)]
        data_s = (time.perf_counter() - start) / args.steps
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        model.train()
        times = []
        for k, batch in enumerate(batches):
            batch.pop("image_sizes", None)
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if k >= 2:
                times.append(time.perf_counter() - t0)
        bare_s = statistics.median(times)
        lengths = [int(b["attention_mask"].sum(1).float().mean()) for b in batches]
        padded = [b["input_ids"].shape[1] for b in batches]

    print(f"the demo's step: released base ({SHIPPED_BASE}), full fine-tuning, batch {args.batch} of the demo's "
          f"chains, {args.threads} CPU threads, {args.steps} steps")
    print(f"text tokens per record: mean {statistics.mean(lengths):.0f}, padded to {statistics.mean(padded):.0f} "
          f"(+{(recipe.model.image_size // recipe.model.patch_size) ** 2} image tokens)")
    print(f"{'LLaVA trainer step (train_runtime / steps)':45s} {1000 * trainer_s:8.1f} ms")
    print(f"{'bare step (forward + backward + AdamW)':45s} {1000 * bare_s:8.1f} ms")
    print(f"{'data: LLaVA dataset + collator per batch':45s} {1000 * data_s:8.1f} ms")
    print(f"trainer step / bare step: {trainer_s / bare_s:.2f}x (target <= 1.30x)")


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

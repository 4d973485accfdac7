"""What a TWIST run costs before it runs: parameters, delta size and memory per GPU under DeepSpeed ZeRO-3.

    python -m llava_twist.plan --model-path liuhaotian/llava-v1.5-13b --twist_expert layer --twist_layers all \\
        --gpus 8 --zero3 --batch-per-gpu 16 --max-length 2048

The TWIST model is built on the meta device through the project's own classes (``TwistConfig``,
``TwistLlavaLlamaForCausalLM``, LoRA experts by ``llava_twist.train.lora``) from the checkpoint's ``config.json``:
no weight is read and nothing is allocated but meta tensors. The vision tower is the ``CLIPVisionModel`` LLaVA's
training attaches, built from the tower's config when it is on this machine (a folder, or the Hugging Face cache),
else from CLIP ViT-L/14-336's (LLaVA-1.5's tower), which the output says. Then, in bytes, 16-bit training,
N = nodes x GPUs per node:

- **Trainable model states**: DeepSpeed's own formula, ``estimate_zero3_model_states_mem_needs`` (the function
  ``estimate_zero3_model_states_mem_needs_all_cold`` prints), on the trainable count and the largest trainable
  module: per GPU 18 x trainable / N (16-bit weight and gradient, fp32 master weight and Adam's moments, as
  DeepSpeed counts them) plus 4 x the largest module's parameters (its gathered 16-bit weight and gradient); with
  the optimizer and parameters offloaded, only the latter on GPU and 18 x 1.5 x trainable / nodes on each node's
  CPU. ``..._all_live`` cannot count a meta model (it deduplicates by ``data_ptr()``), and both assume that every
  parameter trains.
- **Frozen parameters** (the base LLaVA, its vision tower, LoRA's expert copies): ZeRO-3 partitions them as the
  others (``from_pretrained`` under ``zero.Init``) but they have no gradient and no optimizer state: 2 x frozen / N
  on each GPU, or, with ``offload_param``, 2 x 1.5 x frozen / nodes on each node's CPU (DeepSpeed's buffer factor).
  A gathered frozen module holds its 16-bit weight only, so the gathered working set is
  max(4 x largest trainable module, 2 x largest frozen module), which replaces DeepSpeed's 4 x largest module.
  With no frozen parameter every figure is DeepSpeed's.
- **Activations** (:func:`activation_bytes`): what autograd keeps per token for LLaVA's recipe (bf16,
  FlashAttention-2 as ``train_mem.py``, so no term in the sequence length squared), layer by layer from the kind of
  layer (frozen, FFN twin, layer twin), plus the fp32 logits, the loss's copy and log-softmax at the head; with gradient
  checkpointing, each decoder layer's input plus one layer recomputed at a time. Twin layers are counted with both
  experts run on every sample (training's ``compute_both``), an upper bound for batches that mix routes.
- **Buffers** the ZeRO-3 config allows, its ``auto`` values resolved from the hidden size as transformers does
  (:mod:`llava_twist.train.zero3`): the prefetch bucket and the gradient reduce bucket (16-bit each), and the
  parameters small enough to persist whole on every GPU (``stage3_param_persistence_threshold``).
  ``stage3_max_live_parameters`` bounds what may be gathered at once; it is printed, not added.

A card fits a run when the per-GPU total is at most 90% of its memory (the rest: CUDA context, NCCL, fragmentation).
How the figures compare with DeepSpeed's estimator and with measurements: ``docs/scale-notes.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scout_data.limits import Bounded, OneLineParser

PROG = "python -m llava_twist.plan"
BF16 = 2  # bytes per 16-bit value
GIB = 2**30
CARDS_GB = (16, 24, 40, 48, 80, 141)  # memory of common training GPUs (V100/T4, 4090/A10, A100, A6000/L40S, ...)
CARD_HEADROOM = 0.9  # share of a card's memory a run may use
# LLaVA-1.5's vision tower, openai/clip-vit-large-patch14-336, as CLIPVisionConfig keywords
CLIP_VIT_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "image_size": 336, "patch_size": 14, "projection_dim": 768}
# DeepSpeed's additional_buffer_factor, which its estimator applies to CPU memory
DS_BUFFER_FACTOR = 1.5
GPUS = Bounded(int, 1, 1024)
NODES = Bounded(int, 1, 4096)
BATCH = Bounded(int, 1, 4096)
LENGTH = Bounded(int, 1, 1_048_576)
LORA_R = Bounded(int, 0, 65536)


class PlanError(ValueError):
    """An input the planner cannot use; the message is one line naming it."""


def _quiet_hub() -> contextlib.AbstractContextManager:
    """The hub client's retry warnings off: a failed lookup is reported in one line of our own."""
    stack = contextlib.ExitStack()
    for name in ("huggingface_hub", "transformers"):
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        stack.callback(logger.setLevel, level)
    return stack


def _cached_config(name: str, local_only: bool) -> Path | None:
    """The folder of ``name``'s ``config.json``: the Hugging Face cache, or the hub (downloading that file only)."""
    from transformers.utils import cached_file

    try:
        with _quiet_hub():
            found = cached_file(name, "config.json", local_files_only=local_only,
                                _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found).parent if found else None


def config_folder(model_path: str) -> tuple[Path, str]:
    """The folder holding ``model_path``'s ``config.json`` and where it came from: a checkpoint folder, a
    ``config.json`` file, or a hub id resolved as LLaVA's loader resolves it (the cache, else the hub)."""
    path = Path(model_path)
    if path.is_dir():
        return path, "folder"
    if path.is_file():
        if path.name != "config.json":
            raise PlanError(f"--model-path {model_path}: a file must be a checkpoint's config.json")
        return path.parent, "config.json"
    from llava_twist.model.builder import looks_like_hub_id

    if not looks_like_hub_id(model_path):
        raise PlanError(f"--model-path {model_path}: no such folder or config.json")
    folder = _cached_config(model_path, local_only=False)
    if folder is None:
        raise PlanError(f"--model-path {model_path}: not a local folder or config.json, and its config.json is "
                        "neither in the Hugging Face cache nor reachable on the hub (offline: pass the checkpoint's "
                        "config.json)")
    return folder, "hub"


def twist_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``twist_*`` settings given on the command line, as TwistConfig takes them."""
    from llava_twist.model.config import USER_SETTINGS
    from llava_twist.train.arguments import parse_layers

    kwargs = {s.name: getattr(args, s.name) for s in USER_SETTINGS if getattr(args, s.name, None) is not None}
    if "twist_layers" in kwargs:
        kwargs["twist_layers"] = parse_layers(kwargs["twist_layers"])
    return kwargs


@dataclass
class Tower:
    """The vision tower's config and where it came from (``assumed``: CLIP ViT-L/14-336's shape stood in)."""

    name: str
    config: Any
    assumed: bool


def vision_tower_config(name: str, mm_hidden_size: int | None) -> Tower:
    """The tower's ``CLIPVisionConfig``: from its folder or the local Hugging Face cache, else CLIP ViT-L/14-336's."""
    from transformers import CLIPVisionConfig

    folder = Path(name) if os.path.isdir(name) else _cached_config(name, local_only=True)
    if folder is None:
        config, assumed = CLIPVisionConfig(**CLIP_VIT_L_336), True
    else:
        try:
            config, assumed = CLIPVisionConfig.from_pretrained(str(folder)), False
        except (OSError, ValueError) as e:
            reason = str(e).splitlines()[0]
            raise PlanError(f"mm_vision_tower {name}: its config.json cannot be read ({reason})") from None
    if mm_hidden_size is not None and config.hidden_size != mm_hidden_size:
        where = "CLIP ViT-L/14-336, assumed," if assumed else f"the vision tower {name}"
        raise PlanError(f"mm_hidden_size {mm_hidden_size} disagrees with {where} (hidden_size {config.hidden_size})")
    return Tower(name=name, config=config, assumed=assumed)


def build_twist_model(config: Any, tower: Tower, lora_r: int = 0, all_trainable: bool = False,
                      init: contextlib.AbstractContextManager | None = None) -> Any:
    """The TWIST model with the vision tower LLaVA's training attaches, frozen as training freezes it (only
    ``twist_`` weights, or LoRA adapters, train; ``all_trainable``: everything, for comparing with DeepSpeed's
    estimator), built under ``init``: the meta device (the planner), or ``deepspeed.zero.Init`` (a GPU check)."""
    import torch
    from transformers import CLIPVisionModel

    from llava_twist.model.builder import freeze_all_but_twist
    from llava_twist.model.modeling import TwistLlavaLlamaForCausalLM

    config = copy.deepcopy(config)
    with tempfile.TemporaryDirectory() as tower_dir, init or torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tower.config.save_pretrained(tower_dir)
        config.mm_vision_tower = tower_dir  # LLaVA's CLIPVisionTower reads the tower's config from a path
        model = TwistLlavaLlamaForCausalLM(config)
        vision = model.get_vision_tower()
        vision.vision_tower = CLIPVisionModel(vision.cfg_only)  # as CLIPVisionTower.load_model, no weight read
        vision.is_loaded = True
        if lora_r:
            from llava_twist.train.lora import add_twist_lora, freeze_for_twist_lora

            add_twist_lora(model, lora_r, alpha=2 * lora_r, dropout=0.0)
            freeze_for_twist_lora(model)
        else:
            freeze_all_but_twist(model)
    model.config.mm_vision_tower = tower.name
    if all_trainable:
        model.requires_grad_(True)
    return model


@dataclass
class ParamCounts:
    """Parameter counts of a TWIST model as training freezes it; ``delta``: what ``twist_delta.safetensors``
    holds (LoRA merged into the expert copies); ``largest_*``: DeepSpeed's "largest layer", the most parameters a
    module holds itself (not counting its children), trainable and frozen; ``persistent``: parameters at or below
    the ZeRO-3 persistence threshold."""

    total: int
    trainable: int
    frozen: int
    router: int
    mixes: int
    lora: int
    twist: int
    delta: int
    delta_tensors: int
    largest_trainable: int
    largest_frozen: int
    persistent: int


def count_parameters(model: Any, persistence_threshold: int) -> ParamCounts:
    from llava_twist.model.modeling import is_twist_param

    params = dict(model.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    delta_names = [n for n in params if is_twist_param(n) and ".lora_" not in n]
    largest = {True: 0, False: 0}
    for module in model.modules():
        for grad in (True, False):
            own = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad is grad)
            largest[grad] = max(largest[grad], own)
    return ParamCounts(
        total=total,
        trainable=trainable,
        frozen=total - trainable,
        router=sum(p.numel() for n, p in params.items() if n.startswith("model.twist_router.")),
        mixes=sum(p.numel() for n, p in params.items() if ".twist_mix." in n),
        lora=sum(p.numel() for n, p in params.items() if ".lora_" in n),
        twist=sum(p.numel() for n, p in params.items() if is_twist_param(n)),
        delta=sum(params[n].numel() for n in delta_names),
        delta_tensors=len(delta_names),
        largest_trainable=largest[True],
        largest_frozen=largest[False],
        persistent=sum(p.numel() for p in params.values() if p.numel() <= persistence_threshold),
    )


def delta_file_bytes(model: Any) -> int:
    """Size of ``twist_delta.safetensors`` in 16-bit: its header (names, shapes, offsets, the base fingerprint)
    and data, laid out as safetensors writes them."""
    from llava_twist.model.modeling import is_twist_param

    shapes = {name.replace(".base_layer.", "."): list(param.shape) for name, param in model.named_parameters()
              if is_twist_param(name) and ".lora_" not in name}
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "twist_base_fingerprint": "0" * 64}}
    offset = 0
    for name in sorted(shapes):  # one dtype: safetensors orders by name
        size = math.prod(shapes[name]) * BF16
        header[name] = {"dtype": "BF16", "shape": shapes[name], "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")))
    return 8 + text + (-text) % 8 + offset


def model_states(trainable: int, largest_trainable: int, frozen: int, largest_frozen: int, gpus_per_node: int,
                 nodes: int, offload_optimizer: bool, offload_param: bool) -> dict[str, int]:
    """Per-GPU and per-node CPU bytes of the model states: DeepSpeed's estimator for the trainable parameters, the
    frozen ones' 16-bit shards (see the module's docstring). With ``frozen == 0`` these are DeepSpeed's figures."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, gathered_trainable = estimate_zero3_model_states_mem_needs(
        total_params=trainable, largest_layer_params=largest_trainable, num_gpus_per_node=gpus_per_node,
        num_nodes=nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_param and offload_optimizer,
        zero_init=True, additional_buffer_factor=DS_BUFFER_FACTOR)
    gathered = max(gathered_trainable, BF16 * largest_frozen)
    gpus = gpus_per_node * nodes
    frozen_gpu = 0 if offload_param else int(BF16 * frozen / gpus)
    frozen_cpu = int(BF16 * frozen / nodes * DS_BUFFER_FACTOR) if offload_param else 0
    if not offload_optimizer:  # DeepSpeed's CPU figure is the largest layer, loaded on every GPU's process
        cpu = int(max(largest_trainable, largest_frozen) * 4 * gpus_per_node * DS_BUFFER_FACTOR)
    return {
        "trainable_states": gpu - gathered_trainable,
        "frozen_shards": frozen_gpu,
        "gathered": gathered,
        "cpu_per_node": cpu + frozen_cpu,
    }


def layer_activation_bytes(kind: str, hidden: int, kv_hidden: int, intermediate: int, learned_mix: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer (16-bit activations, FlashAttention-2) whose output
    needs a gradient. ``kind``: ``frozen`` (gradient through it, no weight of its own trains), ``mlp`` (an FFN
    twin) or ``layer`` (a whole-layer twin); a twin's expert trains (or its LoRA adapters, which keep the same
    inputs)."""
    norm = 4 * hidden  # RMSNorm's fp32 copy of its input
    norm_into_trainable = norm + 2 * hidden  # + its output, kept by the trainable Linear reading it
    norm_trainable = norm_into_trainable + 2 * hidden  # + the normalised input its own weight's gradient needs
    attention = 4 * hidden + 4 * kv_hidden  # q, k, v and the output, kept by FlashAttention
    mlp = 6 * intermediate  # SiLU's input, its output and up_proj's output (the product's factors)
    mlp_trainable = mlp + 2 * intermediate  # + down_proj's input
    mix = 4 * hidden if learned_mix else 0  # both experts' outputs, for the mix's gradient
    frozen = 2 * norm + attention + mlp
    if kind == "frozen":
        return frozen
    if kind == "mlp":
        return norm + attention + norm_into_trainable + mlp + mlp_trainable + mix
    return frozen + 2 * norm_trainable + attention + mlp_trainable + mix


def head_activation_bytes(hidden: int, vocab: int, twist_head: bool) -> int:
    """Per token at the output, at the loss's peak: the final norm's fp32 copy, the fp32 logits the model returns,
    the loss's shifted fp32 copy of them and its log-softmax (4 bytes a vocabulary entry each; in backward their
    gradients take their place); with ``twist_head``, the input its trainable copy's gradient needs."""
    return 4 * hidden + 12 * vocab + (2 * hidden if twist_head else 0)


def activation_bytes(config: Any, batch: int, length: int, checkpointing: bool) -> dict[str, int]:
    """Activation bytes per GPU for ``batch`` sequences of ``length`` tokens (image tokens included, as LLaVA
    truncates the spliced sequence to ``model_max_length``). Without checkpointing, every layer from the first
    twin layer up keeps its activations; with it (and the input gradients training then enables), every layer
    keeps its input and one layer at a time is recomputed."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv_hidden = hidden // config.num_attention_heads * (config.num_key_value_heads or config.num_attention_heads)
    twins = set(config.twin_layer_indices())
    kinds = [config.twist_expert if i in twins else "frozen" for i in range(layers)]
    per_layer = [layer_activation_bytes(k, hidden, kv_hidden, config.intermediate_size, config.twist_mix == "learned")
                 for k in kinds]
    head = head_activation_bytes(hidden, config.vocab_size, bool(config.twist_head))
    tokens = batch * length
    if checkpointing:
        layers_bytes = layers * 2 * hidden + max(per_layer)
    else:
        layers_bytes = sum(per_layer[min(twins):])
    return {"layers": tokens * layers_bytes, "head": tokens * head, "total": tokens * (layers_bytes + head)}


def buffer_bytes(zero: Any, persistent: int) -> dict[str, int]:
    """What the ZeRO-3 config keeps on each GPU beyond the model states (16-bit)."""
    return {
        "prefetch_bucket": BF16 * zero.prefetch_bucket_size,
        "reduce_bucket": BF16 * zero.reduce_bucket_size,
        "persistent_params": BF16 * persistent,
        "total": BF16 * (zero.prefetch_bucket_size + zero.reduce_bucket_size + persistent),
        "max_live_params_bound": BF16 * zero.max_live_parameters,
    }


def smallest_card(per_gpu: int) -> int | None:
    """The smallest of :data:`CARDS_GB` whose memory the run fits in (90% of it), or None."""
    return next((gb for gb in CARDS_GB if per_gpu <= CARD_HEADROOM * gb * GIB), None)


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the planner prints, as one JSON-ready dict; bad input raises :class:`PlanError` (or a
    ValueError of the checks it calls, one line each)."""
    from llava_twist.model.builder import twist_config_for
    from llava_twist.train.zero3 import ZERO3, read_zero3

    folder, source = config_folder(args.model_path)
    config = twist_config_for(folder, **twist_settings(args))
    zero_path = args.zero3_offload or args.zero3 or ZERO3
    zero = read_zero3(zero_path, config.hidden_size)
    tower = vision_tower_config(config.mm_vision_tower, getattr(config, "mm_hidden_size", None))
    model = build_twist_model(config, tower, args.twist_lora_r, args.all_trainable)
    counts = count_parameters(model, zero.param_persistence_threshold)
    states = model_states(counts.trainable, counts.largest_trainable, counts.frozen, counts.largest_frozen, args.gpus,
                          args.nodes, zero.offload_optimizer, zero.offload_param)
    acts = activation_bytes(model.config, args.batch_per_gpu, args.max_length, args.gradient_checkpointing)
    buffers = buffer_bytes(zero, counts.persistent)
    per_gpu = (states["trainable_states"] + states["frozen_shards"] + states["gathered"] + acts["total"]
               + buffers["total"])
    return {
        "model_path": args.model_path,
        "config": str(folder / "config.json"),
        "config_source": source,
        "vision_tower": {"name": tower.name, "assumed_clip_vit_l_336": tower.assumed},
        "twist": {"layers": model.config.twist_layers, "twin_layers": len(model.config.twin_layer_indices()),
                  "decoder_layers": model.config.num_hidden_layers, "expert": model.config.twist_expert,
                  "head": bool(model.config.twist_head), "mix": model.config.twist_mix,
                  "lora_r": args.twist_lora_r, "all_trainable": args.all_trainable},
        "deepspeed": {"config": str(zero_path), "offload_optimizer": zero.offload_optimizer,
                      "offload_param": zero.offload_param, "gpus_per_node": args.gpus, "nodes": args.nodes,
                      "reduce_bucket_size": zero.reduce_bucket_size,
                      "stage3_prefetch_bucket_size": zero.prefetch_bucket_size,
                      "stage3_param_persistence_threshold": zero.param_persistence_threshold,
                      "stage3_max_live_parameters": zero.max_live_parameters},
        "batch": {"per_gpu": args.batch_per_gpu, "max_length": args.max_length,
                  "gradient_checkpointing": args.gradient_checkpointing},
        "parameters": asdict(counts),
        "delta_bytes": delta_file_bytes(model),
        "per_gpu_bytes": {**{k: v for k, v in states.items() if k != "cpu_per_node"}, "activations": acts["total"],
                          "activations_layers": acts["layers"], "activations_head": acts["head"],
                          "buffers": buffers["total"], **{f"buffer_{k}": v for k, v in buffers.items() if k != "total"},
                          "total": per_gpu},
        "cpu_bytes_per_node": states["cpu_per_node"],
        "smallest_card_gb": smallest_card(per_gpu),
    }


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a table for a terminal."""
    p, g, t, d, b = plan["parameters"], plan["per_gpu_bytes"], plan["twist"], plan["deepspeed"], plan["batch"]
    offloaded = [what for what, on in (("optimizer", d["offload_optimizer"]), ("parameters", d["offload_param"])) if on]
    offload = f"offloads the {' and '.join(offloaded)} to CPU" if offloaded else "no offload"
    card = plan["smallest_card_gb"]
    settings = (f"twist_expert={t['expert']} twist_layers={t['layers']} ({t['twin_layers']} of {t['decoder_layers']} "
                f"layers) twist_head={t['head']} twist_mix={t['mix']}"
                + (f" twist_lora_r={t['lora_r']}" if t["lora_r"] else ""))
    lines = [
        f"TWIST plan (estimates) for {plan['model_path']} ({plan['config']})",
        "  " + settings + ("; every parameter counted as trainable" if t["all_trainable"] else ""),
        f"  DeepSpeed {d['config']} ({offload}), {d['nodes']} node(s) x {d['gpus_per_node']} GPU(s)",
        f"  batch {b['per_gpu']} x {b['max_length']} tokens per GPU, gradient checkpointing "
        f"{'on' if b['gradient_checkpointing'] else 'off'}",
    ]
    if plan["vision_tower"]["assumed_clip_vit_l_336"]:
        lines.append(f"  vision tower {plan['vision_tower']['name']}: its config is not on this machine; "
                     "CLIP ViT-L/14-336's shape assumed (LLaVA-1.5's tower)")
    lora = f"  (LoRA adapters {p['lora']:,})" if p["lora"] else ""
    lines += [
        "",
        "parameters",
        *(f"  {name:<34}{p[name]:>16,}" + (lora if name == "trainable" else "")
          for name in ("total", "frozen", "trainable", "router", "mixes")),
        f"delta on disk (bf16)                {_gib(plan['delta_bytes'])}  "
        f"({p['delta']:,} parameters, {p['delta_tensors']} tensors)",
        "",
        "per GPU",
        f"  trainable model states (DeepSpeed) {_gib(g['trainable_states'])}",
        f"  frozen parameter shards (bf16)     {_gib(g['frozen_shards'])}",
        f"  gathered largest module            {_gib(g['gathered'])}",
        f"  activations                        {_gib(g['activations'])}  (decoder layers "
        f"{g['activations_layers'] / GIB:.2f}, head {g['activations_head'] / GIB:.2f})",
        f"  ZeRO-3 buffers                     {_gib(g['buffers'])}  (prefetch {g['buffer_prefetch_bucket'] / GIB:.2f},"
        f" reduce {g['buffer_reduce_bucket'] / GIB:.2f}, persistent {g['buffer_persistent_params'] / GIB:.2f})",
        f"  total                              {_gib(g['total'])}",
        f"  smallest card it fits (90% used)   {f'{card} GB' if card else f'none up to {CARDS_GB[-1]} GB'}",
        f"  (stage3_max_live_parameters lets gathered parameters reach {g['buffer_max_live_params_bound'] / GIB:.2f}"
        " GiB; not added)",
        f"CPU per node{' (offload)' if offloaded else ''}"
        f"{' ' * (24 - 10 * bool(offloaded))}{_gib(plan['cpu_bytes_per_node'])}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from transformers.hf_argparser import string_to_bool

    from llava_twist.model.config import USER_SETTINGS
    from llava_twist.train.zero3 import ZERO3, ZERO3_OFFLOAD

    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog="How each figure is computed: pydoc llava_twist.plan; docs/scale-notes.md")
    p.add_argument("--model-path", required=True,
                   help="a LLaVA-1.5 (or TWIST) checkpoint folder, its config.json, or a hub id")
    counted = ("twist_layers", "twist_expert", "twist_head", "twist_mix", "twist_router", "twist_router_hidden")
    for setting in USER_SETTINGS:
        if setting.name in counted:
            kind = string_to_bool if setting.kind is bool else setting.kind
            p.add_argument(f"--{setting.name}", type=kind, default=None, choices=setting.choices or None,
                           nargs="?" if setting.kind is bool else None, const=True if setting.kind is bool else None,
                           help=f"{setting.help} (unset: {setting.default})")
    p.add_argument("--twist_lora_r", type=LORA_R, default=0,
                   help=f"> 0: grounding experts as LoRA of this rank, as training's --twist_lora_r ({LORA_R})")
    p.add_argument("--gpus", type=GPUS, default=8, help=f"GPUs per node ({GPUS}; default 8)")
    p.add_argument("--nodes", type=NODES, default=1, help=f"nodes ({NODES}; default 1)")
    zero = p.add_mutually_exclusive_group()
    zero.add_argument("--zero3", nargs="?", const=ZERO3, default=None, metavar="JSON",
                      help="a ZeRO-3 DeepSpeed config (default: the checkout's scripts/zero3.json)")
    zero.add_argument("--zero3-offload", nargs="?", const=ZERO3_OFFLOAD, default=None, metavar="JSON",
                      help="the same, LLaVA's with CPU offload by default (scripts/zero3_offload.json); what a "
                           "config offloads is read from it")
    p.add_argument("--batch-per-gpu", type=BATCH, default=16, help=f"sequences per GPU ({BATCH}; default 16, LLaVA's)")
    p.add_argument("--max-length", type=LENGTH, default=2048,
                   help=f"tokens per sequence, image tokens included ({LENGTH}; default 2048, LLaVA's)")
    p.add_argument("--gradient-checkpointing", type=string_to_bool, nargs="?", const=True, default=True,
                   help="True (default, LLaVA's recipe) or False")
    p.add_argument("--all-trainable", action="store_true",
                   help="count every parameter as trainable (what DeepSpeed's estimator assumes), to compare")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """The libraries' warnings and DeepSpeed's accelerator notice (printed on stdout when it is first imported)
    stay out of the plan's output; DeepSpeed's by a filter, since it sets its logger's level when it loads."""
    deepspeed_logger, transformers_logger = logging.getLogger("DeepSpeed"), logging.getLogger("transformers")
    level = transformers_logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deepspeed_logger.addFilter(_errors_only)
        transformers_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            deepspeed_logger.removeFilter(_errors_only)
            transformers_logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with _quiet_libraries():
            plan = make_plan(args)
    except ValueError as exc:  # PlanError, CheckpointError, Zero3ConfigError, TwistConfig's own: one line each
        print(f"{PROG}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

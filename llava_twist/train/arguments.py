"""Command line: LLaVA's ``ModelArguments``/``DataArguments``/``TrainingArguments`` plus ``TwistArguments``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llava.train.train import DataArguments, ModelArguments, TrainingArguments
from transformers import HfArgumentParser

from llava_twist.model.loss import StepWeights


@dataclass
class TwistArguments:
    """TWIST settings. Unset model settings keep the TwistConfig defaults (or, for a TWIST checkpoint, its own)."""

    twist_layers: str | None = field(
        default=None, metadata={"help": "twin layers: all | every_other | comma list of indices (default every_other)"}
    )
    twist_expert: str | None = field(default=None, metadata={"help": "grounding expert copies: mlp | layer"})
    twist_mix: str | None = field(default=None, metadata={"help": "mix a of frozen and grounding: learned | fixed"})
    twist_mix_init: float | None = field(default=None, metadata={"help": "initial (or fixed) a in [0, 1]"})
    twist_router: str | None = field(default=None, metadata={"help": "prompt | token (per-token gate) | none"})
    twist_router_layer: int | None = field(default=None, metadata={"help": "layer whose input the router reads"})
    twist_router_hidden: int | None = field(default=None, metadata={"help": "router hidden width; 0 = linear"})
    twist_router_loss_weight: float | None = field(default=None, metadata={"help": "weight of the router BCE"})
    twist_router_balance: bool | None = field(
        default=None, metadata={"help": "grounding and understanding prompts weigh equally in the router BCE"}
    )
    twist_router_lr: float | None = field(
        default=None, metadata={"help": "learning rate of the router (a small probe); default --learning_rate"}
    )
    twist_step_weights: str | None = field(
        default=None, metadata={"help": "per-step loss weights: '1,1,2' (steps in order), 'answer:2', 'steps:0.5'"}
    )
    twist_head: bool | None = field(
        default=None, metadata={"help": "also give the output layer (lm_head) a trained copy for the grounding route"}
    )
    twist_save_full: bool = field(
        default=False,
        metadata={"help": "also save a full 16-bit TWIST checkpoint (in <dir>/llava-v1.5-full) at each save"},
    )
    twist_skip_bad_records: bool = field(
        default=False, metadata={"help": "skip (and log) bad data records instead of failing on the first"}
    )
    twist_lora_r: int = field(
        default=0, metadata={"help": "> 0: train the grounding experts as LoRA (rank r, --lora_alpha, --lora_dropout)"}
    )

    def config_kwargs(self) -> dict[str, Any]:
        """The ``twist_*`` TwistConfig settings given on the command line."""
        names = ("twist_expert", "twist_mix", "twist_mix_init", "twist_router", "twist_router_layer",
                 "twist_router_hidden", "twist_router_loss_weight", "twist_router_balance", "twist_step_weights",
                 "twist_head")
        kwargs = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.twist_layers is not None:
            kwargs["twist_layers"] = parse_layers(self.twist_layers)
        return kwargs


def parse_layers(value: str) -> str | list[int]:
    """``all`` | ``every_other`` | ``"0,2,5"`` -> list of ints."""
    value = value.strip()
    if value in ("all", "every_other"):
        return value
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--twist_layers {value!r}: expected all, every_other or a comma list of indices") from None


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, TwistArguments]:
    """Parse LLaVA's flags and ``--twist_*``; refuse settings that would change the frozen base."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, TwistArguments))
    model_args, data_args, training_args, twist_args = parser.parse_args_into_dataclasses(
        args=None if argv is None else list(argv)
    )
    check_supported(model_args, training_args, twist_args)
    StepWeights.parse(twist_args.twist_step_weights)
    return model_args, data_args, training_args, twist_args


def check_supported(model_args: ModelArguments, training_args: TrainingArguments, twist_args: TwistArguments) -> None:
    refused = {
        "--lora_enable": training_args.lora_enable,
        "--bits 4/8": training_args.bits in (4, 8),
        "--tune_mm_mlp_adapter": model_args.tune_mm_mlp_adapter,
        "--pretrain_mm_mlp_adapter": model_args.pretrain_mm_mlp_adapter is not None,
        "--freeze_backbone": model_args.freeze_backbone,
    }
    for flag, on in refused.items():
        if on:
            raise ValueError(
                f"{flag} is not supported by TWIST training: only the grounding experts, mixes and router train "
                "(everything else stays frozen); use --twist_lora_r for LoRA grounding experts"
            )
    if twist_args.twist_lora_r < 0:
        raise ValueError(f"--twist_lora_r {twist_args.twist_lora_r}: must be >= 0")
    if twist_args.twist_lora_r and twist_args.twist_save_full:
        raise ValueError(
            "--twist_save_full with --twist_lora_r: the saved delta has the LoRA merged in; make a full checkpoint "
            "from it with llava_twist.model.builder (load_pretrained_model(delta, base) then save_twist_checkpoint)"
        )

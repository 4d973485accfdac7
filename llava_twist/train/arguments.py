"""Command line: LLaVA's ``ModelArguments``/``DataArguments``/``TrainingArguments`` plus ``TwistArguments``: a flag
for each user setting of :data:`llava_twist.model.config.TWIST_SETTINGS` (declared there) and the training-only ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from llava.train.train import DataArguments, ModelArguments, TrainingArguments
from transformers import HfArgumentParser

from llava_twist.model.config import LAYER_PRESETS, USER_SETTINGS, TwistSetting
from llava_twist.model.loss import StepWeights


def _setting_flag(setting: TwistSetting) -> tuple[str, Any, Any]:
    """The field of ``--<name>``: unset (None) keeps the TwistConfig default, or a TWIST checkpoint's own value."""
    own = "a TWIST checkpoint keeps its own"
    if setting.default is None:
        text = f"{setting.help} ({own})"
    else:
        text = f"{setting.help} (unset: {setting.default if setting.default != '' else 'empty'}; {own})"
    return setting.name, setting.kind | None, field(default=None, metadata={"help": text})


TwistSettingArguments = make_dataclass(
    "TwistSettingArguments",
    [_setting_flag(setting) for setting in USER_SETTINGS],
    namespace={"__module__": __name__, "__doc__": "A ``--<name>`` flag for each TwistConfig user setting."},
)


@dataclass
class TwistArguments(TwistSettingArguments):
    """TWIST flags: the TwistConfig user settings (:class:`TwistSettingArguments`), then the training-only ones."""

    twist_router_lr: float | None = field(
        default=None, metadata={"help": "learning rate of the router (a small probe); default --learning_rate"}
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
        kwargs = {s.name: getattr(self, s.name) for s in USER_SETTINGS if getattr(self, s.name) is not None}
        if "twist_layers" in kwargs:
            kwargs["twist_layers"] = parse_layers(kwargs["twist_layers"])
        return kwargs


def parse_layers(value: str) -> str | list[int]:
    """``all`` | ``every_other`` | ``"0,2,5"`` -> list of ints."""
    value = value.strip()
    if value in LAYER_PRESETS:
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

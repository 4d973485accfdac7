"""Fine-tune the TWIST grounding experts (and router, mixes) of a LLaVA-1.5 checkpoint; nothing else changes.

LLaVA's command line plus ``--twist_*`` (see `llava_twist.train.arguments`). Under ``--deepspeed
scripts/zero3.json`` the model is built partitioned (``zero.Init``) and the grounding experts are copied from
the frozen ones with gathered parameters. Saves the grounding-only delta to ``--output_dir`` (and to every
``checkpoint-*``), plus a full TWIST checkpoint in ``<output_dir>/llava-v1.5-full`` with ``--twist_save_full
True`` (our loader reads it as TWIST; LLaVA's own builder and ``llava.eval.run_llava`` as the original model);
resumes from the last ``checkpoint-*`` in ``--output_dir``, as LLaVA does.

    deepspeed llava_twist/train/train_twist.py --deepspeed scripts/zero3.json --model_name_or_path ... (see
    scripts/finetune_twist.sh)
    python -m llava_twist.train.train_twist ...   # one process, no DeepSpeed
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a script (``deepspeed path/to/train_twist.py``): import the package, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import logging  # noqa: E402
import os  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from llava import conversation as conversation_lib  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from llava_twist.model.builder import (  # noqa: E402
    base_fingerprint,
    freeze_all_but_twist,
    load_twist_model,
    resolve_checkpoint,
    twist_config_for,
)
from llava_twist.model.builder import twist_state_dict as plain_twist_state  # noqa: E402
from llava_twist.model.checks import (  # noqa: E402
    check_image_aspect_ratio,
    check_tokenizer_fits,
    load_tokenizer,
    read_checkpoint_config,
    read_config_json,
)
from llava_twist.model.routers import router_for  # noqa: E402
from llava_twist.train.arguments import parse_args  # noqa: E402
from llava_twist.train.data import TwistDataCollator, TwistSupervisedDataset  # noqa: E402
from llava_twist.train.distributed import exit_distributed  # noqa: E402
from llava_twist.train.lora import add_twist_lora, freeze_for_twist_lora, merged_twist_state  # noqa: E402
from llava_twist.train.records import BadRecordError, validated_records  # noqa: E402
from llava_twist.train.trainer import TwistTrainer  # noqa: E402
from llava_twist.train.zero3 import hidden_size_autos  # noqa: E402
from scout_data.output import OutputError, check_output  # noqa: E402

logger = logging.getLogger("llava_twist.train")

# LLaVA flag -> the base config.json field it must equal (TWIST keeps the base's vision modules and vocabulary)
BASE_VISION_FIELDS = {
    "vision_tower": "mm_vision_tower",
    "mm_projector_type": "mm_projector_type",
    "mm_vision_select_layer": "mm_vision_select_layer",
    "mm_vision_select_feature": "mm_vision_select_feature",
    "mm_patch_merge_type": "mm_patch_merge_type",
    "mm_use_im_start_end": "mm_use_im_start_end",
    "mm_use_im_patch_token": "mm_use_im_patch_token",
}


def match_base_vision_args(model_args: Any, base_config: dict[str, Any], where: str) -> None:
    """Fill ``--vision_tower`` from the base when unset; refuse vision flags that disagree with the base."""
    if model_args.vision_tower is None:
        model_args.vision_tower = base_config.get("mm_vision_tower")
    for flag, key in BASE_VISION_FIELDS.items():
        if key in base_config and getattr(model_args, flag) != base_config[key]:
            raise ValueError(
                f"--{flag} {getattr(model_args, flag)!r} differs from the base checkpoint's {key} "
                f"{base_config[key]!r} ({where}); TWIST keeps the base's vision modules and vocabulary: "
                f"pass --{flag} {base_config[key]}"
            )


def fill_deepspeed_hidden_size_autos(training_args: Any, hidden_size: int) -> None:
    """Fill DeepSpeed's hidden-size based ``auto`` buckets with integers
    (:func:`llava_twist.train.zero3.hidden_size_autos`)."""
    ds_config = getattr(training_args, "hf_deepspeed_config", None)
    zero = ds_config.config.get("zero_optimization", {}) if ds_config is not None else {}
    for key, value in hidden_size_autos(hidden_size).items():
        if zero.get(key) == "auto":
            zero[key] = value


def setup_gradient_checkpointing(training_args: Any, router_learns: bool) -> None:
    """Non-reentrant checkpointing: the router runs inside a checkpointed layer, and reentrant checkpointing
    runs that forward without autograd, so the router would silently get no gradient."""
    if not training_args.gradient_checkpointing:
        return
    kwargs = dict(training_args.gradient_checkpointing_kwargs or {})
    if kwargs.get("use_reentrant") and router_learns:
        raise ValueError("gradient checkpointing with use_reentrant=True leaves the TWIST router without gradient")
    kwargs["use_reentrant"] = False
    training_args.gradient_checkpointing_kwargs = kwargs


def set_conversation_template(version: str, tokenizer: Any) -> None:
    """LLaVA's template choice for ``--version`` (v1 for LLaVA-1.5); padding with unk, as LLaVA."""
    if version == "v0":
        raise ValueError("--version v0 adds a pad token (resizing the frozen embeddings); LLaVA-1.5 uses --version v1")
    tokenizer.pad_token = tokenizer.unk_token
    templates = conversation_lib.conv_templates
    conversation_lib.default_conversation = templates.get(version, templates["vicuna_v1"])


def train(argv: Sequence[str] | None = None, attn_implementation: str | None = None) -> TwistTrainer:
    """Parse the command line, train, save; returns the trainer."""
    trainer = prepare_trainer(argv, attn_implementation)
    fit(trainer)
    return trainer


def prepare_trainer(argv: Sequence[str] | None = None, attn_implementation: str | None = None) -> TwistTrainer:
    """Everything before the first step: arguments, base, data, model, trainer. The errors a user can fix
    (bad data, paths, flags) are raised from here, before any training."""
    model_args, data_args, training_args, twist_args = parse_args(argv)
    is_main = training_args.process_index == 0
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO if is_main else logging.WARNING)
    say = logger.info if is_main else (lambda message: None)
    warn = logger.warning if is_main else (lambda message: None)

    ds_config = getattr(training_args, "hf_deepspeed_config", None)
    if twist_args.twist_router_lr is not None and ds_config is not None and "optimizer" in ds_config.config:
        warn("--twist_router_lr is ignored: the DeepSpeed config builds its own optimizer (one learning rate)")
    base = resolve_checkpoint(model_args.model_name_or_path, "--model_name_or_path", training_args.cache_dir)
    base_config = read_checkpoint_config(base)
    tower = base_config.get("mm_vision_tower")  # a folder of the base's (or a hub id, not a folder here)
    check_output(training_args.output_dir, [base], overwrite=True, flag="--output_dir",
                 inside=[base, tower if isinstance(tower, str) else None])
    match_base_vision_args(model_args, base_config, base)
    check_image_aspect_ratio(data_args.image_aspect_ratio, "--image_aspect_ratio")
    records = validated_records(data_args.data_path, data_args.image_folder, twist_args.twist_skip_bad_records, warn)

    config = twist_config_for(base, **twist_args.config_kwargs())
    setup_gradient_checkpointing(training_args, router_for(config).learns)
    compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    model = load_twist_model(
        base,
        config,
        cache_dir=training_args.cache_dir,
        attn_implementation=attn_implementation,
        torch_dtype=torch.bfloat16 if training_args.bf16 else None,
    )
    fill_deepspeed_hidden_size_autos(training_args, model.config.hidden_size)
    model.config.use_cache = False
    lora = twist_args.twist_lora_r > 0
    if lora:
        add_twist_lora(model, twist_args.twist_lora_r, training_args.lora_alpha, training_args.lora_dropout)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()

    tokenizer = load_tokenizer(
        base, cache_dir=training_args.cache_dir, model_max_length=training_args.model_max_length, padding_side="right"
    )
    set_conversation_template(model_args.version, tokenizer)

    vocab = model.get_input_embeddings().weight
    vocab_rows = getattr(vocab, "ds_shape", vocab.shape)[0]
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=training_args.fsdp)
    vision_tower = model.get_vision_tower()
    vision_tower.to(dtype=compute_dtype, device=training_args.device)
    data_args.image_processor = vision_tower.image_processor
    data_args.is_multimodal = True
    model.config.image_aspect_ratio = data_args.image_aspect_ratio
    model.config.tokenizer_padding_side = tokenizer.padding_side
    model.config.tokenizer_model_max_length = tokenizer.model_max_length
    model.config.tune_mm_mlp_adapter = training_args.tune_mm_mlp_adapter = False
    model.config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
    model.config.mm_use_im_start_end = data_args.mm_use_im_start_end = model_args.mm_use_im_start_end
    model.config.mm_projector_lr = training_args.mm_projector_lr
    training_args.use_im_start_end = model_args.mm_use_im_start_end
    model.config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    model.initialize_vision_tokenizer(model_args, tokenizer=tokenizer)
    check_tokenizer_fits(tokenizer, vocab_rows, base)

    trainable, total = (freeze_for_twist_lora if lora else freeze_all_but_twist)(model)
    if model.config.twist_base_fingerprint is None:
        model.config.twist_base_fingerprint = base_fingerprint(model)
    check_resumable(training_args.output_dir, model.config.twist_base_fingerprint)
    say(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%): the TWIST weights")

    dataset = TwistSupervisedDataset(records, tokenizer, data_args)
    say(f"{len(dataset)} records: {dataset.task_counts}")
    trainer = TwistTrainer(
        model=model,
        tokenizer=tokenizer,
        args=training_args,
        train_dataset=dataset,
        data_collator=TwistDataCollator(tokenizer=tokenizer),
        save_full=twist_args.twist_save_full,
        router_lr=twist_args.twist_router_lr,
        twist_state_fn=merged_twist_state if lora else plain_twist_state,
    )
    return trainer


def check_resumable(output_dir: str, fingerprint: str) -> None:
    """The ``checkpoint-*`` a run would resume from was trained on this base (a folder of another run is refused
    before training, not at its first resumed step)."""
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        return
    recorded = read_config_json(last).get("twist_base_fingerprint") if os.path.isfile(
        os.path.join(last, "config.json")) else None
    if recorded is not None and recorded != fingerprint:
        raise ValueError(f"--output_dir {output_dir}: {os.path.basename(last)} was trained on another base "
                         "(its base fingerprint differs), so this run cannot resume it; use another --output_dir")


def fit(trainer: TwistTrainer) -> None:
    """Train (resuming from the last ``checkpoint-*`` in the output folder, as LLaVA does) and save the delta."""
    output_dir = trainer.args.output_dir
    resume = any(Path(output_dir).glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_state()
    trainer.model.config.use_cache = True
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        logger.info(f"saved the grounding delta to {output_dir}")


def main(argv: Sequence[str] | None = None, attn_implementation: str | None = None) -> None:
    """Train; a bad input (data, paths, flags) is one line naming it and exit status 2, on every rank. Errors
    during training keep their traceback."""
    try:
        trainer = prepare_trainer(argv, attn_implementation)
    except (BadRecordError, FileNotFoundError, OutputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        exit_distributed(2)
    fit(trainer)
    exit_distributed()


if __name__ == "__main__":
    main()

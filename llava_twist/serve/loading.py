"""Loading a model for inference: a TWIST checkpoint, delta (+ base) or plain LLaVA-1.5 folder, as TWIST or as plain
LLaVA (:func:`load_model`, :class:`LoadedModel`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from llava_twist.serve.result import InferenceError
from scout_data.boxes import model_frame

MODEL_CLASSES = ("twist", "llava")


@dataclass
class LoadedModel:
    """What :func:`load_model` returns; ``is_twist`` is False for a plain ``LlavaLlamaForCausalLM``."""

    tokenizer: Any
    model: Any
    image_processor: Any
    context_len: int
    model_name: str
    is_twist: bool

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def default_box_frame(self) -> str:
        """The frame this model answers in (:func:`scout_data.boxes.model_frame`)."""
        return model_frame(getattr(self.model.config, "image_aspect_ratio", None))


def load_model(
    model_path: str,
    model_base: str | None = None,
    device: str = "auto",
    model_class: str = "twist",
    torch_dtype: torch.dtype | None = None,
    **load_kwargs: Any,
) -> LoadedModel:
    """Load a TWIST checkpoint, delta (+ ``model_base``) or plain LLaVA-1.5 folder; ``model_class="llava"``
    loads the plain ``LlavaLlamaForCausalLM`` instead (the base of retention comparisons).

    ``device="auto"`` picks CUDA when available; dtype is float16 on CUDA, float32 on CPU. ``load_kwargs``
    (``load_8bit``, ``load_4bit``, ``twist_*`` overrides) go to the TWIST builder."""
    from llava.mm_utils import get_model_name_from_path

    device = resolve_device(device)
    if model_class not in MODEL_CLASSES:
        raise InferenceError(f"--model-class {model_class!r}: expected one of {MODEL_CLASSES}")
    from llava_twist.model.builder import resolve_checkpoint

    model_name = get_model_name_from_path(model_path.rstrip("/"))
    try:
        model_path = resolve_checkpoint(model_path, "--model-path")
        model_base = None if model_base is None else resolve_checkpoint(model_base, "--model-base")
    except FileNotFoundError as exc:
        raise InferenceError(str(exc)) from None
    for path, what in ((model_path, "--model-path"), (model_base, "--model-base")):
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            raise InferenceError(f"{what} {path}: no config.json in it; expected a LLaVA-1.5 / TWIST checkpoint folder")
    try:
        if model_class == "llava":
            tokenizer, model, processor, context_len = _load_plain_llava(model_path, model_base, device, torch_dtype)
        else:
            from llava_twist.model.builder import load_pretrained_model

            kwargs = dict(load_kwargs)
            if torch_dtype is not None:
                kwargs["torch_dtype"] = torch_dtype
            tokenizer, model, processor, context_len = load_pretrained_model(
                model_path, model_base, model_name, device=device, **kwargs
            )
    except (OSError, ValueError, KeyError) as exc:
        raise InferenceError(f"cannot load model {model_path}: {exc}") from exc
    return LoadedModel(tokenizer, model, processor, context_len, model_name, model_class == "twist")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def _load_plain_llava(
    model_path: str, model_base: str | None, device: str, torch_dtype: torch.dtype | None
) -> tuple[Any, Any, Any, int]:
    """Plain LLaVA-1.5, built the way our TWIST builder builds (same dtype under ``from_pretrained``), so the
    two compare bit for bit, after the same checks. A TWIST delta folder is not a LLaVA model: its base is loaded
    instead."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    from llava_twist.model.builder import is_twist_delta
    from llava_twist.model.checks import (
        check_checkpoint_weights,
        check_loading_info,
        check_tokenizer_fits,
        load_tokenizer,
        read_checkpoint_config,
    )

    path = model_base if (model_base and is_twist_delta(model_path)) else model_path
    dtype = torch_dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    check_checkpoint_weights(path, read_checkpoint_config(path))
    tokenizer = load_tokenizer(path)
    model, info = LlavaLlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=True,
                                                        output_loading_info=True)
    check_loading_info(info, path)
    check_tokenizer_fits(tokenizer, model.get_input_embeddings().weight.shape[0], path)
    model.to(device)
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model()
    vision_tower.to(device=device)  # float32, as LLaVA's and our builder leave it under device_map "auto"
    model.eval()
    return tokenizer, model, vision_tower.image_processor, getattr(model.config, "max_sequence_length", 2048)

"""Build TWIST from LLaVA-1.5 checkpoints; save and load full checkpoints and grounding-only deltas.

``load_pretrained_model`` has LLaVA's signature and return value ``(tokenizer, model, image_processor,
context_len)`` and loads, by what the folder holds (not by its name):

- a full TWIST checkpoint (``config.json`` with ``model_type: llava_twist``);
- a grounding-only delta (``twist_delta.safetensors`` + config) onto ``model_base``, the LLaVA
  checkpoint it was trained from (refused when shapes or the base fingerprint differ);
- a plain LLaVA-1.5 checkpoint, converted on the fly (grounding experts = copies; the untrained router
  sends every prompt down the frozen route).

Every folder is checked before it loads, by :mod:`llava_twist.model.checks`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from llava_twist.model.checks import (
    VISION_TOWER_PREFIX,
    check_checkpoint_weights,
    check_config_fields,
    check_delta_fits_base,
    check_loading_info,
    check_tokenizer_fits,
    load_tokenizer,
    read_checkpoint_config,
    read_delta,
)
from llava_twist.model.config import TWIST_MODEL_TYPE, TwistConfig
from llava_twist.model.modeling import TwistLlavaLlamaForCausalLM, is_twist_param
from llava_twist.model.twin_layer import TwistOutputHead

DELTA_WEIGHTS = "twist_delta.safetensors"


def looks_like_hub_id(name: str) -> bool:
    """Whether a path that is not on this machine could be a hub id (``liuhaotian/llava-v1.5-7b``)."""
    return name.count("/") <= 1 and not name.startswith((".", "/", "~"))


def resolve_checkpoint(name: str | os.PathLike, flag: str = "--model-path", cache_dir: str | None = None) -> str:
    """A local checkpoint folder for ``name``: the folder itself, or a hub id (``liuhaotian/llava-v1.5-7b``)
    resolved as LLaVA's own loader resolves it (``from_pretrained``'s download and cache; with
    ``HF_HUB_OFFLINE=1``, the cache alone)."""
    if os.path.isdir(name):
        return str(name)
    name = str(name)
    if not looks_like_hub_id(name):
        raise FileNotFoundError(f"{flag} {name}: no such folder (and not a hub id such as liuhaotian/llava-v1.5-7b)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing here
        raise FileNotFoundError(
            f"{flag} {name}: not a local folder, and the hub id could not be resolved "
            f"({type(exc).__name__}; offline, it must be in the Hugging Face cache)"
        ) from exc


def twist_config_for(model_path: str | os.PathLike, **twist_kwargs: Any) -> TwistConfig:
    """TwistConfig for a LLaVA-1.5 checkpoint folder with the given ``twist_*`` settings."""
    from llava.model.language_model.llava_llama import LlavaConfig

    raw = read_checkpoint_config(model_path)
    check_config_fields(twist_kwargs, "TWIST settings")
    if raw["model_type"] == TWIST_MODEL_TYPE:
        config = TwistConfig.from_pretrained(str(model_path))
        for key, value in twist_kwargs.items():
            setattr(config, key, value)
        config.validate_twist()
        return config
    return TwistConfig.from_llava_config(LlavaConfig.from_pretrained(str(model_path)), **twist_kwargs)


def gathered(params: list[nn.Parameter], modifier_rank: int | None = 0) -> contextlib.AbstractContextManager:
    """``deepspeed.zero.GatheredParameters`` under ZeRO-3, a no-op otherwise."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def own_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """A module's original (non-``twist_``) parameters."""
    return {n: p for n, p in module.named_parameters() if not is_twist_param(n)}


@torch.no_grad()
def init_twist_from_frozen(model: TwistLlavaLlamaForCausalLM) -> None:
    """Make every grounding expert an exact copy of its frozen expert and reset router and mixes.

    Works on partitioned parameters under ZeRO-3 (gathered, modified on rank 0, re-partitioned).
    """
    inner = model.get_model()
    pairs = [(f"layer {layer.layer_idx}", frozen, copy)
             for layer in inner.twin_decoder_layers() for frozen, copy in layer.grounding_modules()]
    if isinstance(model.lm_head, TwistOutputHead):
        pairs.append(("lm_head", model.lm_head, model.lm_head.twist_expert))
    for where, frozen, copy in pairs:
        src, dst = own_params(frozen), dict(copy.named_parameters())
        if set(src) != set(dst):
            raise RuntimeError(f"{where}: expert and copy differ: {sorted(set(src) ^ set(dst))}")
        with gathered(list(src.values()) + list(dst.values())):
            for name, param in dst.items():
                param.data.copy_(src[name].data)
    new = [p for n, p in model.named_parameters() if is_twist_param(n) and ".twist_expert." not in f".{n}"]
    with gathered(new):
        inner.reset_twist_router_and_mix()


def freeze_all_but_twist(model: nn.Module) -> tuple[int, int]:
    """Only ``twist_`` parameters train. Returns (trainable, total) parameter counts."""
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_twist_param(name))
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def base_named_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters a LLaVA-1.5 checkpoint holds (not TWIST's, not the separately loaded vision tower)."""
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not is_twist_param(name) and not name.startswith(VISION_TOWER_PREFIX):
            yield name, param


@torch.no_grad()
def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 1024) -> str:
    """:func:`base_fingerprint` over every weight, TWIST's included: which trained model this is."""
    return base_fingerprint(model, samples_per_tensor, model.named_parameters())


def base_fingerprint(
    model: nn.Module, samples_per_tensor: int = 1024, params: Iterable[tuple[str, nn.Parameter]] | None = None
) -> str:
    """A fingerprint of the base weights: names, shapes and a strided sample of every tensor, compared in
    bfloat16 so the same checkpoint matches whether loaded in fp32, fp16 or bf16."""
    digest = hashlib.sha256()
    for name, param in base_named_params(model) if params is None else params:
        with gathered([param], modifier_rank=None):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].to("cpu", torch.bfloat16).view(torch.int16)
            digest.update(f"{name}:{tuple(param.shape)}:".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def twist_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The TWIST weights only (gathered under ZeRO-3), on CPU."""
    state = {}
    for name, param in model.named_parameters():
        if is_twist_param(name):
            with gathered([param], modifier_rank=None):
                state[name] = param.detach().to("cpu").clone().contiguous()
    return state


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_twist_delta(
    model: TwistLlavaLlamaForCausalLM,
    out_dir: str | os.PathLike,
    fingerprint: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the grounding-only delta: ``twist_delta.safetensors`` (the ``twist_`` weights) + ``config.json``
    holding the TWIST settings and the base fingerprint it applies onto.

    ``state``: the TWIST weights, already gathered (under ZeRO-3 every rank gathers, one rank writes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = fingerprint or model.config.twist_base_fingerprint or base_fingerprint(model)
    state = twist_state_dict(model) if state is None else state
    config = TwistConfig.from_dict(model.config.to_dict())
    config.twist_base_fingerprint = fingerprint
    config.save_pretrained(str(out))
    _atomic_save_file(state, out / DELTA_WEIGHTS, {"format": "pt", "twist_base_fingerprint": fingerprint})
    return out


def is_twist_delta(model_path: str | os.PathLike) -> bool:
    return (Path(model_path) / DELTA_WEIGHTS).is_file()


def apply_twist_delta(model: TwistLlavaLlamaForCausalLM, delta_dir: str | os.PathLike, check_base: bool = True) -> None:
    """Load a grounding delta (checked by :func:`~llava_twist.model.checks.read_delta`) into a TWIST model built
    on its base. Refused: a base other than the one the delta is stamped with, names or shapes that do not fit."""
    path = Path(delta_dir) / DELTA_WEIGHTS
    stamped, state = read_delta(path)
    expected = {n: p for n, p in model.named_parameters() if is_twist_param(n)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{n}: delta {tuple(t.shape)} vs model {tuple(expected[n].shape)}" for n, t in state.items()
             if tuple(t.shape) != tuple(getattr(expected[n], "ds_shape", expected[n].shape))]
    if wrong:
        raise ValueError(f"{path}: shapes differ from the base: {wrong[:5]}")
    if check_base:
        recorded, actual = stamped, base_fingerprint(model)
        if actual != recorded:
            raise ValueError(
                f"{path}: this delta was trained on another base (fingerprint {recorded[:12]}..., "
                f"this base {actual[:12]}...); pass the LLaVA checkpoint it was made from as model_base"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            param = expected[name]
            with gathered([param]):
                param.data.copy_(tensor.to(param.dtype))


@contextlib.contextmanager
def _quiet_missing_weight_warnings() -> Iterator[None]:
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_twist_model(
    model_path: str | os.PathLike, config: TwistConfig | None = None, **from_pretrained_kwargs: Any
) -> TwistLlavaLlamaForCausalLM:
    """``from_pretrained`` into TWIST with checks: the folder's config and weights agree (before loading), every
    base weight loads and none is left over; a plain LLaVA checkpoint gets its grounding experts copied from the
    frozen ones; a TWIST checkpoint must hold every TWIST weight."""
    raw = read_checkpoint_config(model_path)
    config = config or twist_config_for(model_path)
    check_checkpoint_weights(model_path, config.to_dict())
    with _quiet_missing_weight_warnings():
        model, info = TwistLlavaLlamaForCausalLM.from_pretrained(
            str(model_path), config=config, output_loading_info=True, **from_pretrained_kwargs
        )
    check_loading_info(info, model_path, twist=True)
    missing = info["missing_keys"]
    missing_base = [k for k in missing if not is_twist_param(k) and not k.startswith(VISION_TOWER_PREFIX)]
    if missing_base:
        raise ValueError(f"{model_path}: checkpoint lacks base weights {missing_base[:5]} ({len(missing_base)} in all)")
    missing_twist = [k for k in missing if is_twist_param(k)]
    if raw["model_type"] == TWIST_MODEL_TYPE and missing_twist:
        raise ValueError(f"{model_path}: TWIST checkpoint lacks TWIST weights {missing_twist[:5]}")
    if raw["model_type"] != TWIST_MODEL_TYPE:  # a LLaVA-1.5 checkpoint (llava_llama, or llava as released)
        init_twist_from_frozen(model)
        if config.twist_base_fingerprint is None:
            model.config.twist_base_fingerprint = base_fingerprint(model)
    return model


def convert_llava_to_twist(
    model_path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, **twist_kwargs: Any
) -> TwistLlavaLlamaForCausalLM:
    """A TWIST model from a LLaVA-1.5 checkpoint folder, each grounding expert a copy of its frozen expert."""
    return load_twist_model(model_path, twist_config_for(model_path, **twist_kwargs), torch_dtype=torch_dtype)


def save_twist_checkpoint(model: TwistLlavaLlamaForCausalLM, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """A full TWIST checkpoint (loadable by TWIST, and by plain LLaVA as the original model)."""
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_pretrained_model(
    model_path: str,
    model_base: str | None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict = "auto",
    device: str = "cuda",
    use_flash_attn: bool = False,
    **kwargs: Any,
) -> tuple[Any, TwistLlavaLlamaForCausalLM, Any, int]:
    """LLaVA's ``load_pretrained_model``, for TWIST checkpoints, deltas (with ``model_base``) and plain
    LLaVA-1.5 checkpoints. Extra ``twist_*`` keyword arguments override the TWIST settings;
    ``torch_dtype`` defaults to float16 on CUDA and float32 elsewhere."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN

    model_path = resolve_checkpoint(model_path, "--model-path")
    model_base = None if model_base is None else resolve_checkpoint(model_base, "--model-base")
    twist_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("twist_")}
    load_kwargs: dict[str, Any] = {"device_map": device_map if device == "cuda" else {"": device}, **kwargs}
    dtype = load_kwargs.pop("torch_dtype", torch.float16 if device == "cuda" else torch.float32)
    if load_8bit or load_4bit:
        from transformers import BitsAndBytesConfig

        if importlib.util.find_spec("bitsandbytes") is None or device != "cuda":
            raise ValueError("--load-8bit/--load-4bit need a CUDA GPU and the bitsandbytes package")

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_8bit,
            load_in_4bit=load_4bit,
            bnb_4bit_compute_dtype=torch.float16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        )
    else:
        load_kwargs["torch_dtype"] = dtype
    if use_flash_attn:
        load_kwargs["attn_implementation"] = "flash_attention_2"

    if is_twist_delta(model_path):
        if model_base is None:
            raise ValueError(
                f"{model_path} is a grounding-only TWIST delta: pass model_base, the LLaVA-1.5 checkpoint it was "
                "trained from (e.g. --model-base liuhaotian/llava-v1.5-7b)"
            )
        config = twist_config_for(model_path, **twist_kwargs)
        check_delta_fits_base(model_path, config, model_base, read_checkpoint_config(model_base))
        model = load_twist_model(model_base, config, low_cpu_mem_usage=True, **load_kwargs)
        apply_twist_delta(model, model_path)
        tokenizer_folder = model_base
    else:
        config = twist_config_for(model_path, **twist_kwargs)
        model = load_twist_model(model_path, config, low_cpu_mem_usage=True, **load_kwargs)
        tokenizer_folder = model_path
    tokenizer = load_tokenizer(tokenizer_folder)

    if getattr(model.config, "mm_use_im_patch_token", True):
        tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if getattr(model.config, "mm_use_im_start_end", False):
        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    check_tokenizer_fits(tokenizer, model.get_input_embeddings().weight.shape[0], tokenizer_folder)

    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model(device_map=load_kwargs["device_map"])
    if not (load_8bit or load_4bit):
        # As LLaVA's loader: under its default device_map "auto" the tower keeps the float32 it loads in (so an
        # understanding answer matches LLaVA's own worker and eval scripts token for token); else the model's dtype.
        vision_tower.to(device=device, dtype=None if device_map == "auto" else dtype)
    model.eval()
    context_len = getattr(model.config, "max_sequence_length", 2048)
    return tokenizer, model, vision_tower.image_processor, context_len

"""Checks of checkpoint folders at the boundary, before anything loads; every loader path calls these.

- ``config.json``: a JSON object of a LLaVA-1.5 Llama checkpoint holding only fields a LLaVA-1.5 or TWIST config
  may hold (:func:`config_fields`), its sizes positive integers, its image settings values LLaVA knows
  (:func:`read_checkpoint_config`); the vision tower's layer and feature choice fit the tower.
- The weights: whole safetensors files whose shapes agree with the config (decoder layers, widths, vocabulary,
  projector input), read from their headers without loading a tensor; the vision tower's folder the same
  (:func:`check_checkpoint_weights`). After loading, the model has a place for every weight, TWIST's included
  (:func:`check_loading_info`): a config listing fewer twin layers, or a fixed mix over learned ones, is refused.
- A TWIST delta: whole, floating point, stamped with its base, fitting that base's config (:func:`read_delta`,
  :func:`check_delta_fits_base`).
- The tokenizer loads and has one embedding row per token, never resized into fresh rows
  (:func:`load_tokenizer`, :func:`check_tokenizer_fits`).

Every refusal is a :class:`CheckpointError`: one line naming the file (and field) and the problem.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from llava_twist.model.config import TWIST_MODEL_TYPE
from llava_twist.model.modeling import is_twist_param
from scout_data.inputs import MAX_CONFIG_BYTES, InputError, read_input

CONFIG_JSON = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS_GLOB = "pytorch_model*.bin"
TOKENIZER_MODEL = "tokenizer.model"
LLAVA_LLAMA_TYPE = "llava_llama"
# The type the released LLaVA-1.5 checkpoints (liuhaotian/llava-v1.5-7b, -13b) carry in their config.json: they
# predate LLaVA's rename to llava_llama, and LLaVA's builder loads them as LlavaLlamaForCausalLM all the same.
LLAVA_RELEASED_TYPE = "llava"
VISION_TOWER_PREFIX = "model.vision_tower."
# Sizes of the language model a checkpoint's config must state (transformers' defaults are a 7B model's).
REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
OPTIONAL_SIZES = ("num_key_value_heads", "mm_hidden_size", "max_position_embeddings")
# What ``llava.mm_utils.process_images`` does something for (any other value silently means "square").
IMAGE_ASPECT_RATIOS = ("pad", "square", "anyres")
# What ``llava``'s CLIP tower does something for (any other value fails at the first question).
VISION_SELECT_FEATURES = ("patch", "cls_patch")
PROJECTOR_TYPE = re.compile(r"linear|identity|mlp\d+x_gelu")  # ``llava.model.multimodal_projector.builder``
# Fields LLaVA (1.2.2, and the released 1.5 checkpoints) writes into a config beside the Llama ones.
LLAVA_FIELDS = (
    "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type", "mm_projector_lr", "mm_vision_tower_lr",
    "mm_resampler_type", "image_aspect_ratio", "image_grid_pinpoints", "image_crop_resolution",
    "image_split_resolution", "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "freeze_mm_vision_resampler",
    "tune_mm_vision_resampler", "unfreeze_mm_vision_tower", "use_mm_proj", "tokenizer_model_max_length",
    "tokenizer_padding_side", "max_sequence_length",
)
# Fields transformers may write besides a LlamaConfig's own (quantized saves, the attention implementation).
TRANSFORMERS_EXTRAS = ("quantization_config", "_attn_implementation", "_flash_attn_2_enabled", "_commit_hash")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Config fields a delta must share with its base (the shapes of what it was trained on).
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "mm_hidden_size",
    "mm_projector_type",
)
# (tensor, axis, config field): that axis of that tensor is the field's value.
LANGUAGE_WIDTHS = (
    ("model.embed_tokens.weight", 0, "vocab_size"),
    ("model.embed_tokens.weight", 1, "hidden_size"),
    ("lm_head.weight", 0, "vocab_size"),
    ("lm_head.weight", 1, "hidden_size"),
    ("model.layers.0.mlp.gate_proj.weight", 0, "intermediate_size"),
    ("model.layers.0.mlp.gate_proj.weight", 1, "hidden_size"),
    ("model.mm_projector.0.weight", 1, "mm_hidden_size"),
    ("model.mm_projector.weight", 1, "mm_hidden_size"),
)
TOWER_WIDTHS = (("vision_model.embeddings.patch_embedding.weight", 0, "hidden_size"),)
LANGUAGE_LAYER = re.compile(r"model\.layers\.(\d+)\.")
TOWER_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message is one line naming the file and the problem."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint folder's ``config.json`` as a dict (a JSON object), or a :class:`CheckpointError`."""
    path = Path(folder) / CONFIG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is {folder} a LLaVA-1.5 checkpoint folder?")
    try:
        config = json.loads(read_input(path, MAX_CONFIG_BYTES))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None
    except InputError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or _first_line(e)})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, got a JSON {type(config).__name__}")
    return config


def check_llava_llama(config: dict[str, Any], where: str) -> None:
    """Refuse a base that is not a LLaVA-1.5 Llama checkpoint (TWIST twins Llama decoder layers)."""
    model_type = config.get("model_type")
    released = model_type == LLAVA_RELEASED_TYPE and "text_config" not in config  # not llava-hf's format
    if model_type not in (LLAVA_LLAMA_TYPE, TWIST_MODEL_TYPE) and not released:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not a LLaVA-1.5 Llama checkpoint ('llava_llama'); "
            "TWIST twins Llama decoder layers (MPT, Mistral and plain language models are not supported)"
        )
    if not isinstance(config.get("mm_vision_tower"), str):
        raise CheckpointError(f"{where}: no mm_vision_tower in config.json; this is a language model, not LLaVA")


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_image_aspect_ratio(value: Any, where: str) -> None:
    """``image_aspect_ratio`` must be one LLaVA's image processing knows (or unset): an unknown value would
    silently be read as ``square`` and boxes drawn in the wrong frame."""
    if value is not None and value not in IMAGE_ASPECT_RATIOS:
        raise CheckpointError(f"{where}: image_aspect_ratio {value!r} is not one LLaVA knows "
                              f"({', '.join(IMAGE_ASPECT_RATIOS)}, or unset)")


@functools.cache
def config_fields() -> frozenset[str]:
    """Every field a LLaVA-1.5 or TWIST ``config.json`` may hold: Llama's (transformers 4.37), LLaVA's, TWIST's."""
    from transformers import LlamaConfig

    from llava_twist.model.config import TWIST_SETTINGS

    return frozenset([*LlamaConfig().to_dict(), *LLAVA_FIELDS, *TRANSFORMERS_EXTRAS, *(s.name for s in TWIST_SETTINGS)])


def check_config_fields(config: dict[str, Any], where: str) -> None:
    """Refuse fields no part of the model reads (a typo of a TWIST or LLaVA setting would silently run with the
    default), naming them and the nearest known field."""
    known = config_fields()
    unknown = sorted(key for key in config if key not in known)
    if unknown:
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, 1))
                 else repr(key) for key in unknown[:5]]
        raise CheckpointError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: not a "
                              "LLaVA-1.5 or TWIST setting, so nothing would read it")


def check_config_values(config: dict[str, Any], where: str) -> None:
    """Only known fields; the sizes are positive integers that divide as Llama needs, and LLaVA's image settings
    are known values."""
    check_config_fields(config, where)
    for field in REQUIRED_SIZES + OPTIONAL_SIZES:
        if field not in config and field in REQUIRED_SIZES:
            raise CheckpointError(f"{where}: no {field}")
        if config.get(field) is not None and not _is_size(config[field]):
            raise CheckpointError(f"{where}: {field} {config[field]!r} is not a positive integer")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if hidden % heads or heads % kv_heads:
        raise CheckpointError(f"{where}: hidden_size {hidden}, num_attention_heads {heads} and num_key_value_heads "
                              f"{kv_heads} do not divide (hidden by heads, heads by key-value heads)")
    for field, kind in (("mm_projector_type", str), ("mm_vision_select_layer", int), ("mm_use_im_start_end", bool),
                        ("mm_use_im_patch_token", bool), ("tie_word_embeddings", bool)):
        value = config.get(field)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CheckpointError(f"{where}: {field} {value!r} is not a {kind.__name__}")
    feature = config.get("mm_vision_select_feature")
    if feature is not None and feature not in VISION_SELECT_FEATURES:
        raise CheckpointError(f"{where}: mm_vision_select_feature {feature!r} is not one LLaVA knows "
                              f"({', '.join(VISION_SELECT_FEATURES)})")
    projector = config.get("mm_projector_type")
    if projector is not None and not PROJECTOR_TYPE.fullmatch(projector):
        raise CheckpointError(f"{where}: mm_projector_type {projector!r} is not one LLaVA builds "
                              "(linear, identity, mlp<N>x_gelu)")
    ratio = config.get("image_aspect_ratio")
    check_image_aspect_ratio(ratio, where)
    if ratio == "anyres" and not isinstance(config.get("image_grid_pinpoints"), list):
        raise CheckpointError(f"{where}: image_aspect_ratio 'anyres' needs image_grid_pinpoints (a list of sizes)")


def read_checkpoint_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a LLaVA-1.5 / TWIST checkpoint or delta folder, checked (:func:`check_config_values`)."""
    config = read_config_json(folder)
    where = str(Path(folder) / CONFIG_JSON)
    check_llava_llama(config, where)
    check_config_values(config, where)
    return config


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """A safetensors file's metadata and ``{name: (dtype, shape)}``, from its header alone; a file that is
    empty, truncated or not safetensors is refused (safetensors checks that the data covers every tensor)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {}
            for name in f.keys():  # noqa: SIM118 - safe_open has no iterator
                piece = f.get_slice(name)
                tensors[name] = (piece.get_dtype(), tuple(piece.get_shape()))
            return f.metadata() or {}, tensors
    except SafetensorError as e:
        size = path.stat().st_size if path.is_file() else 0
        state = "empty" if size == 0 else f"{size} bytes, truncated or not a safetensors file"
        raise CheckpointError(f"{path}: not a whole safetensors file ({state}: {_first_line(e)})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or _first_line(e)})") from e


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a checkpoint's weights, as ``from_pretrained`` picks them; ``[]`` for a
    folder with PyTorch ``.bin`` weights only. A folder with no weights at all is refused."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS).is_file():
        return [folder / SAFE_WEIGHTS]
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from e
        missing = [s for s in shards if not isinstance(s, str) or not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shards that are not in {folder}: {missing[:3]}")
        return [folder / s for s in shards]
    if any(folder.glob(BIN_WEIGHTS_GLOB)):
        return []
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise CheckpointError(f"{folder}: holds no model weights, only {others[:3]} (a TWIST delta?); a base must "
                              "be a full checkpoint: the plain LLaVA-1.5 checkpoint the delta was trained from")
    raise CheckpointError(f"{folder}: holds no model weights ({SAFE_WEIGHTS}, {SAFE_INDEX} or {BIN_WEIGHTS_GLOB})")


def _headers(folder: Path) -> dict[str, tuple[tuple[int, ...], Path]] | None:
    """``{tensor: (shape, file)}`` over every weight file of a folder; None when its weights are ``.bin`` files."""
    files = weight_files(folder)
    if not files:
        return None
    shapes = {}
    for path in files:
        for name, (_, shape) in read_header(path)[1].items():
            shapes[name] = (shape, path)
    return shapes


def _check_shapes(
    config: dict[str, Any], config_path: Path, shapes: dict[str, tuple[tuple[int, ...], Path]],
    layer: re.Pattern[str], widths: tuple[tuple[str, int, str], ...],
) -> None:
    layers = sorted({int(m.group(1)) for name in shapes if (m := layer.match(name))})
    configured = config.get("num_hidden_layers")
    if layers and configured is not None and layers != list(range(configured)):
        where = shapes[next(n for n in shapes if layer.match(n))][1]
        held = f"{len(layers)} layers" if layers == list(range(len(layers))) else f"layers {layers}"
        raise CheckpointError(f"{config_path}: num_hidden_layers {configured} disagrees with the weights: "
                              f"{where} holds {held}")
    for tensor, axis, field in widths:
        value = config.get(field)
        if tensor in shapes and value is not None:
            shape, where = shapes[tensor]
            if len(shape) <= axis or shape[axis] != value:
                raise CheckpointError(f"{config_path}: {field} {value} disagrees with the weights: {tensor} is "
                                      f"{list(shape)} in {where}")


def _check_key_value_heads(config: dict[str, Any], config_path: Path, shapes: dict) -> None:
    tensor = "model.layers.0.self_attn.k_proj.weight"
    if tensor not in shapes:
        return
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    rows = kv_heads * (config["hidden_size"] // heads)
    shape, where = shapes[tensor]
    if shape[0] != rows:
        raise CheckpointError(f"{config_path}: num_key_value_heads {kv_heads} (with num_attention_heads {heads}) "
                              f"disagrees with the weights: {tensor} is {list(shape)} in {where}")


def check_vision_tower(tower: Any, mm_hidden_size: int | None, where: str, select_layer: int | None = None) -> None:
    """A local vision tower folder (``mm_vision_tower``): its config a JSON object, its weights whole and of
    its config's layer count and width, that width the projector's input (``mm_hidden_size``), its patches no
    larger than its images, and ``mm_vision_select_layer`` one of its hidden states. A hub id is left to the hub's
    loader."""
    if not isinstance(tower, str) or not os.path.isdir(tower):
        return
    folder = Path(tower)
    if not (folder / CONFIG_JSON).is_file():
        raise CheckpointError(f"{where}: mm_vision_tower {tower} holds no config.json")
    config = read_config_json(folder)
    if config.get("model_type") == "clip" and isinstance(config.get("vision_config"), dict):
        config = config["vision_config"]
    from transformers import CLIPVisionConfig

    defaults = CLIPVisionConfig()
    config = {f: config.get(f, getattr(defaults, f)) for f in ("hidden_size", "num_hidden_layers", "image_size",
                                                                "patch_size")}
    config_path = folder / CONFIG_JSON
    for field, value in config.items():
        if not _is_size(value):
            raise CheckpointError(f"{config_path}: {field} {value!r} is not a positive integer")
    if config["image_size"] < config["patch_size"]:
        raise CheckpointError(f"{config_path}: image_size {config['image_size']} is smaller than patch_size "
                              f"{config['patch_size']}: the tower would see no patch")
    states = config["num_hidden_layers"] + 1  # the embeddings, then each layer's output
    if select_layer is not None and not -states <= select_layer < states:
        raise CheckpointError(f"{where}: mm_vision_select_layer {select_layer} is not one of the vision tower's "
                              f"{states} hidden states (-{states} to {states - 1}; {config_path})")
    if mm_hidden_size is not None and config["hidden_size"] != mm_hidden_size:
        raise CheckpointError(f"{where}: mm_hidden_size {mm_hidden_size} disagrees with the vision tower's "
                              f"hidden_size {config['hidden_size']} ({config_path})")
    shapes = _headers(folder)
    if shapes is not None:
        _check_shapes(config, config_path, shapes, TOWER_LAYER, TOWER_WIDTHS)


def check_checkpoint_weights(folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """The weights of a LLaVA-1.5 / TWIST checkpoint folder are whole and agree with its ``config`` (as loaded:
    a delta's config may be the one applied), and so are its vision tower's."""
    config_path = Path(folder) / CONFIG_JSON
    shapes = _headers(Path(folder))
    if shapes is not None:
        _check_shapes(config, config_path, shapes, LANGUAGE_LAYER, LANGUAGE_WIDTHS)
        _check_key_value_heads(config, config_path, shapes)
    check_vision_tower(config.get("mm_vision_tower"), config.get("mm_hidden_size"), str(config_path),
                       config.get("mm_vision_select_layer"))


def check_loading_info(info: dict[str, list], folder: str | os.PathLike, twist: bool = False) -> None:
    """After ``from_pretrained(..., output_loading_info=True)``: weights the model had no place for mean the
    config disagrees with them (e.g. fewer layers, or fewer twin layers); they would be dropped without a word. A
    saved vision tower is an expected extra, and so are TWIST's own weights when plain LLaVA reads a TWIST
    checkpoint (``twist=False``); a TWIST model (``twist=True``) must have a place for every one."""
    unexpected = [k for k in info.get("unexpected_keys", [])
                  if not (is_twist_param(k) and not twist) and not k.startswith(VISION_TOWER_PREFIX)]
    if unexpected:
        settings = " (its twist_layers, twist_mix, twist_expert or twist_head?)" if any(map(is_twist_param,
                                                                                            unexpected)) else ""
        raise CheckpointError(f"{Path(folder) / CONFIG_JSON}: disagrees with the weights, which hold "
                              f"{len(unexpected)} tensors it has no place for{settings} ({unexpected[:3]})")


def read_delta(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A TWIST delta's base fingerprint and weights: the file whole, every tensor floating point and finite,
    stamped with its base in its own metadata (the authority), which the folder's ``config.json`` must not
    contradict."""
    metadata, header = read_header(path)
    stamped = metadata.get("twist_base_fingerprint")
    if not stamped:
        raise CheckpointError(f"{path}: carries no base fingerprint in its metadata, so its base cannot be verified")
    configured = read_config_json(path.parent).get("twist_base_fingerprint")
    if configured and configured != stamped:
        raise CheckpointError(f"{path}: its metadata and {path.parent / CONFIG_JSON} name different bases")
    not_float = [f"{name} ({dtype})" for name, (dtype, _) in sorted(header.items()) if dtype not in FLOAT_DTYPES]
    if not_float:
        raise CheckpointError(f"{path}: weights must be floating point; {not_float[:3]} ({len(not_float)} tensors) "
                              "are not")
    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    broken = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if broken:
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in {broken[:5]} ({len(broken)} tensors)")
    return stamped, state


def check_delta_fits_base(
    delta: str | os.PathLike, delta_config: Any, base: str | os.PathLike, base_config: dict[str, Any]
) -> None:
    """A delta applies onto the base it was trained on: same shapes (``SHAPE_FIELDS``)."""
    differ = [f"{f}: delta {getattr(delta_config, f, None)} vs base {base_config.get(f)}" for f in SHAPE_FIELDS
              if getattr(delta_config, f, None) != base_config.get(f)]
    if differ:
        raise CheckpointError(f"{delta}: delta does not fit base {base}: {'; '.join(differ)}")


def load_tokenizer(folder: str | os.PathLike, **kwargs: Any) -> Any:
    """LLaVA-1.5's slow Llama tokenizer from a checkpoint folder (``AutoTokenizer``, ``use_fast=False``), or a
    :class:`CheckpointError` naming its file."""
    from transformers import AutoTokenizer

    model_file = Path(folder) / TOKENIZER_MODEL
    if model_file.is_file() and model_file.stat().st_size == 0:
        raise CheckpointError(f"{model_file}: empty file (a SentencePiece model was expected)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=False, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        where = model_file if model_file.is_file() else Path(folder)
        raise CheckpointError(f"{where}: the tokenizer cannot be loaded ({type(e).__name__}: {_first_line(e)})") from e


def check_tokenizer_fits(tokenizer: Any, embedding_rows: int, folder: str | os.PathLike) -> None:
    """The tokenizer, with the tokens the config adds (LLaVA's image tokens), has exactly one embedding row per
    token: a tokenizer of another model is refused, never given fresh rows (or its extra rows cut)."""
    if len(tokenizer) != embedding_rows:
        model_file = Path(folder) / TOKENIZER_MODEL
        where = model_file if model_file.is_file() else Path(folder)
        raise CheckpointError(f"{where}: the tokenizer has {len(tokenizer)} tokens (with the image tokens the config "
                              f"adds) but the model's embeddings {embedding_rows} rows: another model's tokenizer, or "
                              "one lacking tokens the config promises? (embeddings are never resized)")

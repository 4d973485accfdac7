"""Prompting: the conversation template, the image, and a batch of token ids (left-padded) with the image tensors.

Batches are left-padded: LLaVA's ``prepare_inputs_labels_for_multimodal`` drops the padding given by the attention
mask and re-pads on ``config.tokenizer_padding_side`` (``right`` in training), which is wrong for generation with a
decoder-only model; :mod:`llava_twist.serve.generation` sets it to ``left`` for each call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from llava_twist.serve.images import ImageError, read_image
from llava_twist.serve.loading import LoadedModel
from llava_twist.serve.result import InferenceError

# The template LLaVA-1.5 trains with (``--version v1``) and its eval scripts use (``--conv-mode vicuna_v1``); LLaVA's
# ``llava_v1`` differs in the system prompt ("human" for "user"), which a model trained on ``v1`` has never seen.
DEFAULT_CONV_MODE = "vicuna_v1"


def load_image(path: str, orient: bool = True) -> Image.Image:
    """The RGB picture in an image file (:func:`llava_twist.serve.images.read_image`; ``orient``: EXIF
    orientation applied, as a viewer shows it), or an :class:`InferenceError` naming the file."""
    try:
        return read_image(path, f"image file {path}", orient=orient)
    except ImageError as exc:
        raise InferenceError(str(exc)) from None


def build_prompt(query: str, conv_mode: str = DEFAULT_CONV_MODE, mm_use_im_start_end: bool = False) -> str:
    """The full prompt for one image and one question, as LLaVA's ``model_vqa`` builds it."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise InferenceError(f"--conv-mode {conv_mode!r}: unknown; LLaVA knows {sorted(conv_templates)}")
    image_token = DEFAULT_IMAGE_TOKEN
    if mm_use_im_start_end:
        image_token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    qs = query.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], image_token + "\n" + qs)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def context_limit(loaded: LoadedModel) -> int:
    """Positions the model can attend over: LLaVA's context length, capped by the language model's positions."""
    positions = getattr(loaded.model.config, "max_position_embeddings", None) or loaded.context_len
    return min(loaded.context_len, positions)


@functools.lru_cache(maxsize=8)
def _longest_token(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` stands for (a piece's text, or its byte as ``<0x..>``)."""
    return max(len(piece) for piece in tokenizer.get_vocab())


def check_prompt_size(loaded: LoadedModel, prompts: Sequence[str]) -> None:
    """Refuse, before tokenizing it, a prompt too long to fit the context even at the tokenizer's longest token per
    character (tokenizing megabytes took seconds, only to be refused)."""
    limit = context_limit(loaded)
    for prompt in prompts:
        fewest = len(prompt) // _longest_token(loaded.tokenizer)
        if fewest >= limit:
            raise InferenceError(f"the prompt is {len(prompt)} characters, at least {fewest} tokens, and the model's "
                                 f"context is {limit}: shorten the question")


def check_prompt_length(loaded: LoadedModel, prompt_ids: Sequence[torch.Tensor]) -> None:
    """Refuse a prompt that, with its image's tokens, leaves no room in the context (it would answer garbage)."""
    from llava.constants import IMAGE_TOKEN_INDEX

    image_tokens = loaded.model.get_vision_tower().num_patches
    limit = context_limit(loaded)
    for ids in prompt_ids:
        length = len(ids) + int((ids == IMAGE_TOKEN_INDEX).sum()) * (image_tokens - 1)
        if length >= limit:
            raise InferenceError(
                f"the prompt is {length} tokens with the image's {image_tokens}, and the model's context is "
                f"{limit}: shorten the question"
            )


def prepare_inputs(
    loaded: LoadedModel, queries: Sequence[str], images: Sequence[Image.Image], conv_mode: str = DEFAULT_CONV_MODE
) -> dict[str, Any]:
    """Left-padded ``input_ids`` and ``attention_mask``, the image tensor and sizes for a batch."""
    if len(queries) != len(images):
        raise ValueError(f"{len(queries)} queries but {len(images)} images")
    mm_start_end = bool(getattr(loaded.model.config, "mm_use_im_start_end", False))
    return prepare_prompts(loaded, [build_prompt(q, conv_mode, mm_start_end) for q in queries], images)


def prompt_ids(loaded: LoadedModel, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Each prompt's token ids (``IMAGE_TOKEN_INDEX`` for its ``<image>``), after :func:`check_prompt_length`."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    # the tokenizer's own "longer than the specified maximum" warning, once: check_prompt_length states the limit
    loaded.tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    check_prompt_size(loaded, prompts)
    ids = [tokenizer_image_token(p, loaded.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt") for p in prompts]
    check_prompt_length(loaded, ids)
    return ids


def prepare_prompts(loaded: LoadedModel, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, Any]:
    """:func:`prepare_inputs` for whole prompts (a conversation template already applied, one ``<image>`` token
    per image); no images: a text-only batch (``images`` is None)."""
    from llava.mm_utils import process_images

    ids = prompt_ids(loaded, prompts)
    width = max(len(x) for x in ids)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = x
        attention_mask[i, width - len(x):] = 1
    pixels = None
    if images:
        pixels = process_images(list(images), loaded.image_processor, loaded.model.config)
        if isinstance(pixels, list):
            pixels = [p.to(loaded.device, dtype=loaded.dtype) for p in pixels]
        else:
            pixels = pixels.to(loaded.device, dtype=loaded.dtype)
    return {
        "input_ids": input_ids.to(loaded.device),
        "attention_mask": attention_mask.to(loaded.device),
        "images": pixels,
        "image_sizes": [im.size for im in images] if images else None,
    }

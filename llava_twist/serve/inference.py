"""Loading a model and generating answers, shared by the CLI, the evaluation runner and the playground.

One query about one image goes: prompt (LLaVA conversation template, ``<image>`` token) -> token ids ->
padded image tensor -> ``generate`` (TWIST with a route, or plain LLaVA) -> text -> an
:class:`~llava_twist.serve.result.InferenceResult` (:mod:`llava_twist.serve.result`: the parsed chain and its
boxes in pixels of the original image; :mod:`llava_twist.serve.drawing` draws them).

Batches are left-padded: LLaVA's ``prepare_inputs_labels_for_multimodal`` drops the padding given by the
attention mask and re-pads on ``config.tokenizer_padding_side`` (``right`` in training), which is wrong
for generation with a decoder-only model; :func:`generate` sets it to ``left`` for the call.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from llava_twist.model.routes import ROUTES
from llava_twist.serve.images import ImageError, read_image
from llava_twist.serve.result import InferenceError, InferenceResult, answer_box_spans, result_from_text
from scout_data.boxes import model_frame
from scout_data.limits import Bounded

# The template LLaVA-1.5 trains with (``--version v1``) and its eval scripts use (``--conv-mode vicuna_v1``); LLaVA's
# ``llava_v1`` differs in the system prompt ("human" for "user"), which a model trained on ``v1`` has never seen.
DEFAULT_CONV_MODE = "vicuna_v1"
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


TEMPERATURE = Bounded(float, 0, 100)
NUM_BEAMS = Bounded(int, 1, 32)
MAX_NEW_TOKENS = Bounded(int, 1, 32768)
TOP_P = Bounded(float, 0, 1)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """LLaVA's generation flags, each with its limit in ``--help`` (:class:`GenerationSettings` checks them too)."""
    parser.add_argument("--temperature", type=TEMPERATURE, default=0.0, help=f"{TEMPERATURE}; 0: greedy")
    parser.add_argument("--top_p", type=TOP_P, default=None, help=f"{TOP_P}; default: the model's")
    parser.add_argument("--num_beams", type=NUM_BEAMS, default=1, help=f"{NUM_BEAMS}")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=MAX_NEW_TOKENS, default=512,
                        help=f"{MAX_NEW_TOKENS}")


@dataclass
class GenerationSettings:
    conv_mode: str = DEFAULT_CONV_MODE
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    max_new_tokens: int = 512
    route: str = "auto"  # TWIST only: auto | frozen | grounding
    box_frame: str | None = None  # frame of the model's box text; None: the model's default

    def __post_init__(self) -> None:
        if problem := self.problem():
            raise InferenceError(problem)

    @classmethod
    def from_args(cls, args: Any) -> GenerationSettings:
        """The settings a command line's flags name (LLaVA's: ``--conv-mode``, ``--temperature``, ``--top_p``,
        ``--num_beams``, ``--max_new_tokens``, and ``--route``, ``--box-frame`` where it has them)."""
        return cls(conv_mode=args.conv_mode, temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
                   max_new_tokens=args.max_new_tokens, route=getattr(args, "route", "auto"),
                   box_frame=getattr(args, "box_frame", None))

    def problem(self) -> str | None:
        """What cannot be right in these settings (one line naming the flag), or None."""
        if self.route not in ROUTES:
            return f"--route {self.route!r}: expected one of {ROUTES}"
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            return f"--temperature {self.temperature}: expected a number of at least 0 (0: greedy)"
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            return f"--top_p {self.top_p}: expected a number in [0, 1] (transformers' range)"
        if self.num_beams < 1 or self.max_new_tokens < 1:
            return (f"--num_beams {self.num_beams}, --max_new_tokens {self.max_new_tokens}: beams and new tokens "
                    "must be at least 1")
        return None

    def frame(self, loaded: LoadedModel) -> str:
        return self.box_frame or loaded.default_box_frame()


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


def prepare_prompts(loaded: LoadedModel, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, Any]:
    """:func:`prepare_inputs` for whole prompts (a conversation template already applied, one ``<image>`` token
    per image); no images: a text-only batch (``images`` is None)."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    # the tokenizer's own "longer than the specified maximum" warning, once: check_prompt_length states the limit
    loaded.tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    ids = [tokenizer_image_token(p, loaded.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt") for p in prompts]
    check_prompt_length(loaded, ids)
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


class TokenLogprobRecorder(LogitsProcessor):
    """Notes where generation starts in ``sequences`` (transformers 4.37 puts a BOS column before the new
    tokens when generating from ``inputs_embeds``) and, with ``logprobs``, the log-probability of each
    generated token (greedy / sampling, not beams) without keeping every step's logits: at each step it
    reads the token chosen from the previous step's distribution."""

    def __init__(self, logprobs: bool = True) -> None:
        self.logprobs = logprobs
        self.start: int | None = None
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        if not self.logprobs:
            return scores
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:].to(self.prev.device)).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def generated(self, sequences: torch.Tensor) -> torch.Tensor:
        """The generated tokens of ``sequences`` (what ``generate`` returned)."""
        return sequences[:, self.start:] if self.start is not None else sequences

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probabilities of the T generated tokens of ``sequences``."""
        new = self.generated(sequences)
        steps = list(self.steps)
        if self.prev is not None and len(steps) < new.shape[1]:
            steps.append(self.prev.gather(1, new[:, -1:].to(self.prev.device)).squeeze(1))
        if not steps:
            return torch.zeros((new.shape[0], 0))
        return torch.stack(steps, dim=1).cpu()


@contextlib.contextmanager
def _left_padding(model: Any) -> Iterator[None]:
    config = model.config
    before = getattr(config, "tokenizer_padding_side", "right")
    config.tokenizer_padding_side = "left"
    try:
        yield
    finally:
        config.tokenizer_padding_side = before


def _last_route(loaded: LoadedModel) -> Any:
    """The route decision of the last prefill (None for plain LLaVA)."""
    return loaded.model.twist_last_route if loaded.is_twist else None


def _generation_kwargs(loaded: LoadedModel, settings: GenerationSettings) -> dict[str, Any]:
    if problem := settings.problem():  # a dataclass's fields can be reassigned after construction
        raise InferenceError(problem)
    tokenizer = loaded.tokenizer
    kwargs: dict[str, Any] = {
        "do_sample": settings.temperature > 0,
        "num_beams": settings.num_beams,
        "max_new_tokens": settings.max_new_tokens,
        "use_cache": True,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if settings.temperature > 0:
        kwargs["temperature"] = settings.temperature
        if settings.top_p is not None:
            kwargs["top_p"] = settings.top_p
    if loaded.is_twist:
        kwargs["twist_route"] = settings.route
    return kwargs


def _trim(row: torch.Tensor, eos_id: int | None) -> list[int]:
    ids = row.tolist()
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids


def span_scores(
    tokenizer: Any, ids: Sequence[int], logprobs: Sequence[float], text: str, spans: Sequence[tuple[int, int]]
) -> list[float]:
    """Geometric-mean probability of the tokens that overlap each character span of ``text`` (the stripped
    decode of ``ids``)."""
    if not spans:
        return []
    full = tokenizer.decode(ids, skip_special_tokens=True)
    shift = len(full) - len(full.lstrip())
    ends, last = [], spans[-1][1] + shift
    for i in range(len(ids)):
        ends.append(len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)))
        if ends[-1] >= last:
            break
    starts = [0] + ends[:-1]
    out = []
    for s, e in spans:
        s, e = s + shift, e + shift
        lp = [logprobs[i] for i in range(len(ends)) if starts[i] < e and ends[i] > s]
        out.append(math.exp(sum(lp) / len(lp)) if lp else 0.0)
    return out


def _route_rows(decision: Any, n: int, num_beams: int) -> list[tuple[str | None, float | None, bool]]:
    if decision is None:
        return [(None, None, False)] * n
    probs, routes = decision.prob.tolist(), decision.routes()
    step = num_beams if len(routes) == n * num_beams else 1
    return [(routes[i * step], float(probs[i * step]), bool(decision.forced)) for i in range(n)]


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    queries: Sequence[str],
    images: Sequence[Image.Image],
    settings: GenerationSettings | None = None,
) -> list[InferenceResult]:
    """Answer a batch (one query per image) in one ``generate`` call; greedy batched output equals
    one-by-one output."""
    settings = settings or GenerationSettings()
    frame = settings.frame(loaded)
    inputs = prepare_inputs(loaded, queries, images, settings.conv_mode)
    kwargs = _generation_kwargs(loaded, settings)
    recorder = TokenLogprobRecorder(logprobs=settings.num_beams == 1)
    kwargs["logits_processor"] = LogitsProcessorList([recorder])
    with _left_padding(loaded.model):
        sequences = loaded.model.generate(
            inputs["input_ids"],
            images=inputs["images"],
            image_sizes=inputs["image_sizes"],
            attention_mask=inputs["attention_mask"],
            **kwargs,
        )
    logprobs = recorder.finish(sequences) if recorder.logprobs else None
    sequences = recorder.generated(sequences)
    routes = _route_rows(_last_route(loaded), len(queries), settings.num_beams)
    eos = loaded.tokenizer.eos_token_id
    results = []
    for i, (query, image) in enumerate(zip(queries, images, strict=True)):
        ids = _trim(sequences[i], eos)
        text = loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
        route, prob, forced = routes[i]
        scores = None
        if logprobs is not None:
            scores = span_scores(loaded.tokenizer, ids, logprobs[i].tolist(), text, answer_box_spans(text))
        results.append(result_from_text(text, image.size, frame, route, prob, forced, scores, query))
    return results


def stream_generate(
    loaded: LoadedModel, query: str, image: Image.Image, settings: GenerationSettings | None = None
) -> Iterator[str | InferenceResult]:
    """Yield text increments as they are generated, then the :class:`InferenceResult` (with the route)."""
    settings = settings or GenerationSettings()
    mm_start_end = bool(getattr(loaded.model.config, "mm_use_im_start_end", False))
    prompt = build_prompt(query, settings.conv_mode, mm_start_end)
    for item in stream_prompt(loaded, prompt, image, settings):
        if isinstance(item, InferenceResult):
            item.prompt = query
        yield item


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        return self.event.is_set()


def stream_prompt(
    loaded: LoadedModel,
    prompt: str,
    image: Image.Image | None,
    settings: GenerationSettings | None = None,
    stop: str | None = None,
) -> Iterator[str | InferenceResult]:
    """:func:`stream_generate` for a whole prompt (template applied, an ``<image>`` token when ``image`` is given),
    ending early when the text reaches ``stop`` (LLaVA's ``stop`` string, not part of the text). Closing the
    iterator stops the generation at its next token and waits for it to end."""
    from llava.mm_utils import KeywordsStoppingCriteria

    settings = settings or GenerationSettings()
    frame = settings.frame(loaded)
    inputs = prepare_prompts(loaded, [prompt], [image] if image is not None else [])
    kwargs = _generation_kwargs(loaded, settings)
    cancel = threading.Event()
    kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
    if stop:
        kwargs["stopping_criteria"].append(KeywordsStoppingCriteria([stop], loaded.tokenizer, inputs["input_ids"]))
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=None)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode(), _left_padding(loaded.model):
                loaded.model.generate(
                    inputs["input_ids"],
                    images=inputs["images"],
                    image_sizes=inputs["image_sizes"],
                    attention_mask=inputs["attention_mask"],
                    streamer=streamer,
                    **kwargs,
                )
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text, ended = "", False
    try:
        for piece in streamer:
            if not piece:
                continue
            if stop and (text + piece).find(stop) >= 0:
                piece = (text + piece)[: (text + piece).find(stop)][len(text):]
                if piece:
                    text += piece
                    yield piece
                break
            text += piece
            yield piece
        else:
            ended = True
    finally:  # left early (the stop string, a client gone, a worker stopping): no generation goes on unread
        if not ended:
            cancel.set()
            for _ in streamer:  # to the streamer's end, which generate signals when it stops
                pass
        thread.join()
    if failure:
        raise failure[0]
    route, prob, forced = _route_rows(_last_route(loaded), 1, settings.num_beams)[0]
    size = image.size if image is not None else (1, 1)
    yield result_from_text(text.strip(), size, frame, route, prob, forced, None, prompt)


def last_route(loaded: LoadedModel) -> tuple[str | None, float | None, bool]:
    """Route, router probability and whether it was forced, of the last prefill (Nones for plain LLaVA)."""
    return _route_rows(_last_route(loaded), 1, 1)[0]

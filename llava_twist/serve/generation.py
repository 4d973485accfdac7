"""Generation: the settings (LLaVA's flags), one batched ``generate`` call with each answer's route, and streaming.

One query about one image goes: prompt (:mod:`llava_twist.serve.prompting`) -> ``generate`` (TWIST with a route, or
plain LLaVA) -> text -> an :class:`~llava_twist.serve.result.InferenceResult` (the parsed chain and its boxes in
pixels of the original image; :mod:`llava_twist.serve.drawing` draws them). The route each prompt took comes back
with the output of ``generate`` (``twist_decision``), never from the model's state.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
)
from transformers.generation.streamers import BaseStreamer

from llava_twist.model.routes import Route
from llava_twist.model.routing import RouteDecision
from llava_twist.serve.loading import LoadedModel
from llava_twist.serve.prompting import DEFAULT_CONV_MODE, build_prompt, prepare_inputs, prepare_prompts
from llava_twist.serve.result import InferenceError, InferenceResult, answer_box_spans, result_from_text
from scout_data.limits import Bounded

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
    route: Route = Route.AUTO  # TWIST only; a route's name is parsed here
    box_frame: str | None = None  # frame of the model's box text; None: the model's default

    def __post_init__(self) -> None:
        if problem := self.problem():
            raise InferenceError(problem)
        self.route = Route.parse(self.route)

    @classmethod
    def from_args(cls, args: Any) -> GenerationSettings:
        """The settings a command line's flags name (LLaVA's: ``--conv-mode``, ``--temperature``, ``--top_p``,
        ``--num_beams``, ``--max_new_tokens``, and ``--route``, ``--box-frame`` where it has them)."""
        return cls(conv_mode=args.conv_mode, temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
                   max_new_tokens=args.max_new_tokens, route=getattr(args, "route", Route.AUTO),
                   box_frame=getattr(args, "box_frame", None))

    def problem(self) -> str | None:
        """What cannot be right in these settings (one line naming the flag), or None."""
        try:
            Route.parse(self.route, "--route")
        except ValueError as exc:
            return str(exc)
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

    def batch_key(self) -> tuple[Any, ...]:
        """What requests sharing one ``generate`` call must agree on (routes, lengths and stops may differ)."""
        greedy = self.temperature <= 0
        return (greedy, None if greedy else self.temperature, None if greedy else self.top_p, self.num_beams)


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


def _generation_kwargs(loaded: LoadedModel, settings: GenerationSettings, routes: Sequence[Route] | None = None,
                       rows_apart: bool = False, batched_products: bool = False) -> dict[str, Any]:
    """``generate``'s keyword arguments for ``settings``; ``routes``: one per prompt instead of ``settings.route``;
    ``rows_apart``: each prompt of a padded batch computed as alone (TWIST, :mod:`llava_twist.model.rows_apart`);
    ``batched_products``: with it, a decode step's rows multiplied in one product (faster, rounding by batch)."""
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
        "return_dict_in_generate": True,
    }
    if settings.temperature > 0:
        kwargs["temperature"] = settings.temperature
        if settings.top_p is not None:
            kwargs["top_p"] = settings.top_p
    if loaded.is_twist:
        kwargs["twist_route"] = list(routes) if routes is not None else Route.parse(settings.route)
        kwargs["twist_rows_apart"] = rows_apart
        kwargs["twist_batched_products"] = batched_products
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


RouteRow = tuple[Route | None, float | None, bool]  # route taken, router probability, forced (Nones: plain LLaVA)
NO_ROUTE: RouteRow = (None, None, False)


def route_rows(decision: RouteDecision | None, n: int) -> list[RouteRow]:
    """Each of ``n`` rows' route, router probability and whether it was forced, from ``generate``'s
    ``twist_decision`` (None, plain LLaVA: Nones)."""
    if decision is None:
        return [NO_ROUTE] * n
    return list(zip(decision.routes(), decision.probs(), decision.forced_rows(), strict=True))


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    queries: Sequence[str],
    images: Sequence[Image.Image],
    settings: GenerationSettings | None = None,
    routes: Sequence[Route | str] | None = None,
    rows_apart: bool = False,
) -> list[InferenceResult]:
    """Answer a batch (one query per image) in one ``generate`` call, each with the route it took; ``routes``: one
    per query (auto and forced mixed) instead of ``settings.route``. By default a padded batch is computed as LLaVA
    computes it (TWIST's frozen route bit for bit what ``LlavaLlamaForCausalLM`` answers to the same batch: what
    retention compares); ``rows_apart`` (TWIST) computes each prompt as alone instead (row attention), as the
    serving batches do."""
    settings = settings or GenerationSettings()
    if routes is not None and len(routes) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(routes)} routes")
    routes = None if routes is None else [Route.parse(r) for r in routes]
    frame = settings.frame(loaded)
    inputs = prepare_inputs(loaded, queries, images, settings.conv_mode)
    kwargs = _generation_kwargs(loaded, settings, routes, rows_apart)
    recorder = TokenLogprobRecorder(logprobs=settings.num_beams == 1)
    kwargs["logits_processor"] = LogitsProcessorList([recorder])
    with _left_padding(loaded.model):
        out = loaded.model.generate(
            inputs["input_ids"],
            images=inputs["images"],
            image_sizes=inputs["image_sizes"],
            attention_mask=inputs["attention_mask"],
            **kwargs,
        )
    logprobs = recorder.finish(out.sequences) if recorder.logprobs else None
    sequences = recorder.generated(out.sequences)
    decided = route_rows(getattr(out, "twist_decision", None), len(queries))
    eos = loaded.tokenizer.eos_token_id
    results = []
    for i, (query, image) in enumerate(zip(queries, images, strict=True)):
        ids = _trim(sequences[i], eos)
        text = loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
        route, prob, forced = decided[i]
        scores = None
        if logprobs is not None:
            scores = span_scores(loaded.tokenizer, ids, logprobs[i].tolist(), text, answer_box_spans(text))
        results.append(result_from_text(text, image.size, frame, route, prob, forced, scores, query))
    return results


# ---------------------------------------------------------------- streaming, one call for many prompts


Emit = Callable[[Any], None]


@dataclass
class StreamRow:
    """One prompt of a streamed batch: ``emit`` gets its text pieces as ``(piece, route row)``, then its
    :class:`InferenceResult`. ``gone`` set (its reader left): no more pieces, and it no longer holds the batch."""

    prompt: str  # the whole prompt (template applied, an ``<image>`` token when ``image`` is given)
    image: Image.Image | None
    emit: Emit
    route: Route = Route.AUTO
    max_new_tokens: int = 512
    stop: str | None = None  # LLaVA's stop string: the answer ends before it
    label: str | None = None  # the result's ``prompt`` (default: ``prompt``)
    gone: threading.Event = field(default_factory=threading.Event)


class _RowText(TextStreamer):
    """One row's text, as transformers' streamers cut it (whole words), cut again at the row's stop string."""

    def __init__(self, tokenizer: Any, row: StreamRow, route: Callable[[], RouteRow]) -> None:
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.row = row
        self.route = route
        self.text = ""
        self.tokens = 0
        self.done = False
        self._word_ends: dict[int, bool] = {}

    def put(self, value: torch.Tensor) -> None:
        """Decodes (the costly part with LLaVA's slow tokenizer) only at a token that can end a word: a piece that
        starts one (``▁``) or a byte (a newline, a space); between them the printable text cannot grow."""
        if self._ends_word(int(value)):
            super().put(value)
        else:
            self.token_cache.extend(value.tolist())

    def _ends_word(self, token: int) -> bool:
        ends = self._word_ends.get(token)
        if ends is None:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            ends = not isinstance(piece, str) or not piece or piece[0] in "▁ \n<" or not piece.isprintable()
            self._word_ends[token] = ends
        return ends

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.done and not stream_end:
            return
        if self.row.stop and (self.text + text).find(self.row.stop) >= 0:
            text = (self.text + text)[: (self.text + text).find(self.row.stop)][len(self.text):]
            self.done = True
        if text:
            self.text += text
            if not self.row.gone.is_set():
                self.row.emit((text, self.route()))

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.end()


class _RowsStreamer(BaseStreamer):
    """Hands each row of a batched ``generate`` its own tokens; a row ends at EOS, its own token limit, its stop
    string or when its reader goes. Pieces wait for the route decision (made in the prefill, recorded just after the
    first token is put)."""

    def __init__(self, loaded: LoadedModel, rows: Sequence[StreamRow], decisions: list[RouteDecision]) -> None:
        self.decisions = decisions
        self.eos = loaded.tokenizer.eos_token_id
        self.texts = [_RowText(loaded.tokenizer, row, functools.partial(self.route, i)) for i, row in enumerate(rows)]
        self.prompt_seen = False
        self.pending: list[tuple[int, torch.Tensor]] = []

    def route(self, i: int) -> RouteRow:
        if not self.decisions:
            return NO_ROUTE
        return route_rows(self.decisions[0], len(self.texts))[i]

    def finished(self) -> bool:
        return all(t.done or t.row.gone.is_set() for t in self.texts)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate puts the prompt's ids first
            self.prompt_seen = True
            return
        for i, text in enumerate(self.texts):
            if text.done:
                continue
            token = value[i:i + 1]
            if self.eos is not None and int(token) == self.eos:
                text.finish()
                continue
            text.tokens += 1
            self.pending.append((i, token))
            if text.tokens >= text.row.max_new_tokens:
                self.pending.append((i, None))
        if self.decisions or not isinstance(self.decisions, list):
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i, token in pending:
            if token is None:
                self.texts[i].finish()
            elif not self.texts[i].done:
                self.texts[i].put(token)

    def end(self) -> None:
        self.flush()
        for text in self.texts:
            text.finish()


class _Finished(StoppingCriteria):
    def __init__(self, streamer: _RowsStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        return self.streamer.finished()


@torch.inference_mode()
def stream_rows(loaded: LoadedModel, rows: Sequence[StreamRow], settings: GenerationSettings,
                batched_products: bool = False) -> None:
    """Generate every row in one ``generate`` call (greedy or sampled with ``settings``; rows may differ in route,
    length and stop), streaming each row's pieces and then its result to its ``emit``, in this thread. The call
    ends when every row has ended or gone; a greedy row's text is the same as alone (``batched_products``: decode
    steps multiply the rows in one product, faster, and a near tie's answer may then differ from alone)."""
    if not rows:
        return
    if settings.num_beams != 1:
        raise InferenceError(f"--num_beams {settings.num_beams}: streaming generates greedily or samples (1 beam)")
    images = [row.image for row in rows if row.image is not None]
    if images and len(images) != len(rows):
        raise ValueError("a streamed batch has an image for every prompt or for none")
    inputs = prepare_prompts(loaded, [row.prompt for row in rows], images)
    settings = replace(settings, max_new_tokens=max(row.max_new_tokens for row in rows))
    kwargs = _generation_kwargs(loaded, settings, [row.route for row in rows], rows_apart=True,
                                batched_products=batched_products)
    decisions: list[RouteDecision] = []
    if loaded.is_twist:
        kwargs["twist_decisions"] = decisions
    streamer = _RowsStreamer(loaded, rows, decisions if loaded.is_twist else None)
    kwargs["stopping_criteria"] = StoppingCriteriaList([_Finished(streamer)])
    with _left_padding(loaded.model):
        loaded.model.generate(
            inputs["input_ids"],
            images=inputs["images"],
            image_sizes=inputs["image_sizes"],
            attention_mask=inputs["attention_mask"],
            streamer=streamer,
            **kwargs,
        )
    frame = settings.frame(loaded)
    for i, (row, text) in enumerate(zip(rows, streamer.texts, strict=True)):
        if row.gone.is_set():
            continue
        route, prob, forced = streamer.route(i)
        size = row.image.size if row.image is not None else (1, 1)
        row.emit(result_from_text(text.text.strip(), size, frame, route, prob, forced, None,
                                  row.label if row.label is not None else row.prompt))


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


def stream_prompt(
    loaded: LoadedModel,
    prompt: str,
    image: Image.Image | None,
    settings: GenerationSettings | None = None,
    stop: str | None = None,
) -> Iterator[str | InferenceResult]:
    """:func:`stream_generate` for a whole prompt (template applied, an ``<image>`` token when ``image`` is given),
    ending early when the text reaches ``stop`` (LLaVA's ``stop`` string, not part of the text), generated alone on
    a thread of its own (:class:`llava_twist.serve.batching.Batcher` shares generations between callers). Closing
    the iterator stops the generation at its next token and waits for it to end."""
    settings = settings or GenerationSettings()
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    row = StreamRow(prompt, image, items.put, settings.route, settings.max_new_tokens, stop)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            stream_rows(loaded, [row], settings)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
        finally:
            items.put(_END)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _END:
            yield item if isinstance(item, InferenceResult) else item[0]
    finally:  # left early (a client gone, a worker stopping): the generation stops at its next token
        row.gone.set()
        thread.join()
    if failure:
        raise failure[0]


_END = object()

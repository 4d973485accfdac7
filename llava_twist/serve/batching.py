"""Concurrent requests share generations: a :class:`Batcher` answers the requests that arrived while the model was
busy in one ``generate`` call (:func:`llava_twist.serve.generation.stream_rows`), each streaming its own tokens.

One thread owns the model. When it is free it takes the oldest waiting request and up to ``max_batch - 1`` more
that can share its call (same sampling settings, all with an image or none; routes, lengths and stop strings may
differ; a request that found the model idle waits up to ``gather_s`` for others sent with it), generates them
together, and streams each its pieces and its result. Requests beyond ``max_batch`` wait for the next call; beyond
``max_waiting`` waiting, a request is refused (:class:`QueueFull`). A reader that leaves frees its place at once:
waiting, it is dropped; generating, its row stops counting and the call ends early when every row has ended or gone.
Left padding, the attention mask and :mod:`llava_twist.model.rows_apart` give each row the computation it gets
alone, prompt and decode steps, so a greedy answer is the same text batched or alone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from llava_twist.serve.generation import GenerationSettings, RouteRow, StreamRow, stream_rows
from llava_twist.serve.loading import LoadedModel
from llava_twist.serve.prompting import prompt_ids
from llava_twist.serve.result import InferenceResult

Piece = tuple[str, RouteRow]  # a text piece with the route its prompt takes


class QueueFull(Exception):
    """Too many requests are waiting; the message says how many and what to do."""


class _End:
    """The end of a request's stream."""


@dataclass
class _Request:
    row: StreamRow
    settings: GenerationSettings
    items: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    arrived: float = field(default_factory=time.monotonic)

    def key(self) -> tuple[Any, ...]:
        return (*self.settings.batch_key(), self.row.image is not None)


class Batcher:
    """Batches the generations of concurrent callers of :meth:`stream` on one model (see the module's docstring)."""

    def __init__(self, loaded: LoadedModel, max_batch: int = 8, max_waiting: int = 64, gather_s: float = 0.05,
                 batched_products: bool = False) -> None:
        if max_batch < 1 or max_waiting < 0 or gather_s < 0:
            raise ValueError(f"max_batch {max_batch}, max_waiting {max_waiting}, gather_s {gather_s}: at least 1, 0, 0")
        self.loaded = loaded
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.gather_s = gather_s
        self.batched_products = batched_products  # see stream_rows: speed for exactness at a near tie
        self._changed = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self.batch_sizes: list[int] = []  # of every call so far, for tests and benchmarks
        self._thread = threading.Thread(target=self._serve, name="batcher", daemon=True)
        self._thread.start()

    def queue_length(self) -> int:
        """Requests waiting or generating whose reader is still there."""
        with self._changed:
            return sum(not r.row.gone.is_set() for r in (*self._waiting, *self._running))

    def stream(
        self,
        prompt: str,
        image: Image.Image | None,
        settings: GenerationSettings,
        stop: str | None = None,
        label: str | None = None,
        idle_s: float | None = None,
    ) -> Iterator[Piece | InferenceResult | None]:
        """Pieces of this prompt's answer with their route, then its :class:`InferenceResult`; ``None`` after each
        ``idle_s`` seconds without one (to keep a client's read alive). Raises :class:`QueueFull` at the first
        ``next`` when too many wait, and an :class:`InferenceError` for a prompt the model cannot take (before it
        joins a batch, so one bad prompt never fails the others). Closing the iterator frees the request's place."""
        prompt_ids(self.loaded, [prompt])
        request = _Request(StreamRow(prompt, image, None, settings.route, settings.max_new_tokens, stop, label),
                           settings)
        request.row.emit = request.items.put
        with self._changed:
            waiting = sum(not r.row.gone.is_set() for r in self._waiting)
            if waiting >= self.max_waiting:
                raise QueueFull(f"the queue is full ({waiting} waiting, the limit): ask again later")
            self._waiting.append(request)
            self._changed.notify_all()
        try:
            while True:
                try:
                    item = request.items.get(timeout=idle_s)
                except queue.Empty:
                    yield None
                    continue
                if item is _End:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.row.gone.set()
            with self._changed:
                if request in self._waiting:
                    self._waiting.remove(request)

    def _take(self) -> list[_Request]:
        with self._changed:
            while True:
                while self._waiting and self._waiting[0].row.gone.is_set():
                    self._waiting.popleft()
                if self._waiting:
                    break
                self._changed.wait()
            gathered = self._waiting[0].arrived + self.gather_s  # those sent with it arrive within the window
            while len(self._waiting) < self.max_batch and (left := gathered - time.monotonic()) > 0:
                self._changed.wait(left)
            first = self._waiting.popleft()
            batch = [first]
            for request in list(self._waiting):
                if len(batch) == self.max_batch:
                    break
                if not request.row.gone.is_set() and request.key() == first.key():
                    self._waiting.remove(request)
                    batch.append(request)
            self._running = batch
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._take()
            self.batch_sizes.append(len(batch))
            try:
                stream_rows(self.loaded, [r.row for r in batch], batch[0].settings, self.batched_products)
            except Exception as exc:  # noqa: BLE001 - every caller of the call hears of it
                for request in batch:
                    request.items.put(exc)
            finally:
                with self._changed:
                    self._running = []
                for request in batch:
                    request.items.put(_End)

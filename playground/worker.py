"""One request's generations on a worker thread that holds the model lock from the first piece to the last.

A Gradio handler that is cancelled or whose client disconnects is abandoned, not closed: its generator's
``finally`` runs only when the garbage collector gets to it. So the handler never holds the lock: the worker
takes it, runs every generation of the request to its end, frees it, and only then reports an error. The
handler reads pieces; a request it abandons costs the rest of its generation and never blocks the next one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Generation = Callable[[], Iterable[Any]]


class _End:
    """Marks the end of one generation's pieces."""


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error


class GenerationJob:
    """Runs ``generations`` one after another under ``lock`` on a daemon thread, as soon as the lock is free.

    :meth:`pieces` yields the next generation's pieces. After :meth:`abandon`, generations not yet started are
    skipped (the one running goes on to its end: a model mid-``generate`` cannot be interrupted safely). A request
    that is dropped without being closed calls it late or never, so its later generations may run too: the lock
    is freed all the same when they end."""

    def __init__(self, lock: threading.Lock, generations: list[Generation]) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._abandoned = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(lock, generations), name="playground-generation", daemon=True
        )
        self._thread.start()

    def _work(self, lock: threading.Lock, generations: list[Generation]) -> None:
        ending: Any = _End
        try:
            with lock:
                for k, generation in enumerate(generations):
                    if k and self._abandoned.is_set():
                        break
                    try:
                        for piece in generation():
                            self._queue.put(piece)
                    except BaseException as exc:  # noqa: BLE001 - the reader must hear of any end
                        ending = _Failed(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                        break
                    self._queue.put(_End)
        finally:
            self._queue.put(ending)  # after the lock is free; a reader waiting for another generation gets it

    def pieces(self) -> Iterator[Any]:
        """The pieces of the next generation, in order; raises the error a generation raised."""
        while True:
            item = self._queue.get()
            if item is _End:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def abandon(self) -> None:
        self._abandoned.set()

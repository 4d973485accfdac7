"""LLaVA's serving protocol, both sides of the wire: a worker's request fields, its null-delimited JSON chunks, and
a client of the controller and its workers (``llava.serve.controller``, any LLaVA 1.2.2 model worker).

A chunk is ``{"text": prompt + answer so far, "error_code": 0}``; a TWIST worker adds ``twist_route``,
``router_prob`` and the steps and boxes parsed so far (LLaVA's clients read ``text`` and ``error_code`` only).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from llava_twist.model.routes import ROUTES, Route

CHUNK_END = b"\0"
MAX_NEW_TOKENS = 1024  # LLaVA's worker caps a request's new tokens here
GREEDY_BELOW = 0.001  # LLaVA's worker samples only above this temperature
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0  # a worker silent this long is taken for gone
CHUNK_DEADLINE_S = 60.0  # between two chunks of an answer once it has begun (keep-alive NULs do not count)
ANSWER_DEADLINE_S = 600.0  # a whole answer, the wait for the model included
MAX_CHUNK_BYTES = 8 << 20  # one chunk: the prompt, the answer so far and its parse


class RequestError(ValueError):
    """A request the worker refuses, with what is wrong with it (sent back as an error chunk)."""


@dataclass(frozen=True)
class WorkerRequest:
    """``/worker_generate_stream``'s fields as LLaVA's clients send them, plus ``twist_route``."""

    prompt: str
    images: tuple[str, ...]  # base64-encoded images, one per ``<image>`` token of the prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: str | None = None
    route: Route = Route.AUTO

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW


def _number(params: dict[str, Any], key: str, default: float, kind: type, low: float, high: float) -> Any:
    value = params.get(key, default)
    if value is None:
        return default
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if not wrong_type and abs(value) > 1e300:
        raise RequestError(f"{key} is out of range; expected a value from {low:g} to {high:g}")
    if wrong_type or (kind is int and not float(value).is_integer()):
        raise RequestError(f"{key} is {value!r}; expected {'an integer' if kind is int else 'a number'}")
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(f"{key} is {value!r}; expected a value from {low:g} to {high:g}")
    return kind(value)


def parse_request(params: Any) -> WorkerRequest:
    """The request a client sent, checked field by field (:class:`RequestError` names the first problem)."""
    if not isinstance(params, dict):
        raise RequestError(f"the request is {type(params).__name__}; expected a JSON object")
    prompt = params.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"prompt is {prompt!r}; expected the conversation as a non-empty string")
    images = params.get("images") or []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RequestError("images must be a list of base64-encoded image strings")
    stop = params.get("stop")
    if stop is not None and not isinstance(stop, str):
        raise RequestError(f"stop is {stop!r}; expected a string")
    for key, text in (("prompt", prompt), ("stop", stop or "")):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"{key} holds a lone surrogate ({text[exc.start]!r} at character {exc.start}); "
                               "expected Unicode text") from None
    route = params.get("twist_route")
    try:
        route = Route.AUTO if route is None else Route.parse(route, "twist_route")
    except ValueError:
        raise RequestError(f"twist_route is {route!r}; expected one of {', '.join(ROUTES)}") from None
    return WorkerRequest(
        prompt=prompt,
        images=tuple(images),
        temperature=_number(params, "temperature", 1.0, float, 0.0, 100.0),
        top_p=_number(params, "top_p", 1.0, float, 0.0, 1.0),
        max_new_tokens=min(_number(params, "max_new_tokens", 256, int, 1, 1 << 20), MAX_NEW_TOKENS),
        stop=stop or None,
        route=route,
    )


def encode_chunk(chunk: dict[str, Any]) -> bytes:
    return json.dumps(chunk).encode() + CHUNK_END


def error_chunk(message: str) -> dict[str, Any]:
    return {"text": message, "error_code": 1}


# ---------------------------------------------------------------- client side


class ServingError(Exception):
    """The controller or a worker cannot be reached, or has no such model."""


def _post(url: str, payload: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    try:
        response = requests.post(url, json=payload, timeout=timeout)
        response.raise_for_status()
        return response.json()
    except (requests.RequestException, ValueError) as exc:
        raise ServingError(f"{url}: {exc}") from exc


def list_models(controller: str) -> list[str]:
    """The models the controller's live workers serve, sorted (after it refreshes its workers, as LLaVA's UI)."""
    _post(controller.rstrip("/") + "/refresh_all_workers")
    return sorted(_post(controller.rstrip("/") + "/list_models")["models"])


def worker_address(controller: str, model: str) -> str:
    """The address of a worker serving ``model``; :class:`ServingError` when none does."""
    address = _post(controller.rstrip("/") + "/get_worker_address", {"model": model})["address"]
    if not address:
        raise ServingError(f"no worker serves model {model!r} (it is not listed by the controller at {controller})")
    return address


def worker_status(address: str) -> dict[str, Any]:
    return _post(address.rstrip("/") + "/worker_get_status")


class StreamError(Exception):
    """A worker's stream that is given up: a deadline passed or a chunk too large; the message says which."""


def split_chunks(pieces: Iterable[bytes], max_chunk: int = MAX_CHUNK_BYTES) -> Iterator[bytes]:
    """The NUL-delimited chunks of a byte stream, in time linear in its length (an empty chunk for each keep-alive
    NUL); a chunk longer than ``max_chunk`` is a :class:`StreamError`."""
    buffer = bytearray()
    for piece in pieces:
        start = 0
        while (end := piece.find(CHUNK_END, start)) >= 0:
            buffer += piece[start:end]
            if len(buffer) > max_chunk:
                break
            yield bytes(buffer)
            buffer.clear()
            start = end + 1
        else:
            buffer += piece[start:]
        if len(buffer) > max_chunk:
            raise StreamError(f"sent a chunk over {max_chunk} bytes")
    if buffer:
        yield bytes(buffer)


def stream_chunks(address: str, payload: dict[str, Any], read_timeout: float = READ_TIMEOUT_S,
                  chunk_deadline: float = CHUNK_DEADLINE_S, answer_deadline: float = ANSWER_DEADLINE_S,
                  max_chunk: int = MAX_CHUNK_BYTES) -> Iterator[dict]:
    """The chunks a worker streams for ``payload``. A worker that cannot be reached, drops the connection, goes
    silent for ``read_timeout`` seconds, takes longer than ``chunk_deadline`` between two chunks of a begun answer
    (keep-alive NULs or a byte at a time do not count) or ``answer_deadline`` for the whole answer, or sends a chunk
    over ``max_chunk`` bytes, ends the stream with an error chunk saying so (never a hang)."""
    url = address.rstrip("/") + "/worker_generate_stream"
    received, started = 0, time.monotonic()
    last = started

    def pieces(response: requests.Response) -> Iterator[bytes]:
        while piece := response.raw.read1(1 << 16):  # whatever has arrived: deadlines are checked as bytes come
            now = time.monotonic()
            if now - started > answer_deadline:
                raise StreamError(f"did not finish its answer in {answer_deadline:g} s")
            if received and now - last > chunk_deadline:
                raise StreamError(f"sent no chunk for {chunk_deadline:g} s mid-answer")
            yield piece

    try:
        with requests.post(url, json=payload, stream=True, timeout=(CONNECT_TIMEOUT_S, read_timeout)) as response:
            for line in split_chunks(pieces(response), max_chunk):
                if line:
                    received += 1
                    last = time.monotonic()
                    yield json.loads(line.decode("utf-8"))
    except StreamError as exc:
        yield error_chunk(f"the worker at {address} {exc}")
    except (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError) as exc:
        what = "went silent mid-answer" if received else "did not answer"
        yield error_chunk(f"the worker at {address} {what} for {read_timeout:g} s ({type(exc).__name__})")
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        what = "went away mid-answer" if received else "cannot be reached"
        yield error_chunk(f"the worker at {address} {what} ({type(exc).__name__})")
    except (ValueError, RecursionError) as exc:
        yield error_chunk(f"the worker at {address} sent a chunk that is not JSON ({type(exc).__name__})")

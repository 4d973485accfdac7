"""The worker and its client do bounded work (issue 48): a client that leaves mid-answer frees the model at once,
whatever the garbage collector does; a body, a prompt and a chunk each have a size limit; every network read of
the client has a deadline. The worker runs in this process, driven through its ASGI app as uvicorn drives it."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from llava.conversation import conv_templates

from llava_twist.serve.inference import load_model
from llava_twist.serve.model_worker import TwistModelWorker, build_app
from llava_twist.serve.worker_protocol import split_chunks, stream_chunks
from scout_data.inputs import MAX_REQUEST_BYTES

ANSWER_TOKENS = 1024
FREED_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def long_context_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA with room for a 1024-token answer after its prompt."""
    from llava_twist.tiny import TinyLlavaSpec, build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("long-llava") / "llava-v1.5-tiny",
                            TinyLlavaSpec(max_position_embeddings=2048))


@pytest.fixture(scope="module")
def worker(long_context_llava: Path) -> TwistModelWorker:
    loaded = load_model(str(long_context_llava), device="cpu")
    # never the end-of-sequence token: every answer runs to its max_new_tokens
    loaded.model.generation_config.suppress_tokens = [loaded.tokenizer.eos_token_id]
    return TwistModelWorker(loaded, "m", "http://w", "http://c", limit_model_concurrency=2)


def payload(max_new_tokens: int = ANSWER_TOKENS, **extra: object) -> dict:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "Tell me a long story.")
    conv.append_message(conv.roles[1], None)
    return {"prompt": conv.get_prompt(), "temperature": 0.0, "max_new_tokens": max_new_tokens, **extra}


SCOPE = {"type": "http", "method": "POST", "path": "/worker_generate_stream", "query_string": b"",
         "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("client", 1), "root_path": ""}


def call(app: Callable, body_messages: list[dict], leave: Callable[[list[bytes]], bool] = lambda body: False,
         headers: list[tuple[bytes, bytes]] = ()) -> list[bytes]:
    """Drive ``app`` with ``body_messages``; the client leaves (``http.disconnect``) once ``leave(body so far)``."""
    body: list[bytes] = []

    async def run() -> None:
        messages = list(body_messages)
        left = asyncio.Event()

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if leave(body):
                    left.set()

        await asyncio.wait_for(app({**SCOPE, "headers": [(b"content-type", b"application/json"), *headers]},
                                   receive, send), timeout=300)

    asyncio.run(run())
    return body


def chunks_of(body: list[bytes]) -> list[dict]:
    return [json.loads(c) for c in split_chunks(body) if c]


def test_a_client_gone_mid_answer_frees_the_model_within_a_second(worker: TwistModelWorker) -> None:
    """Starlette never closes a sync body generator whose client left; the generation then ran to its end (37.5 s
    for the next request) unless the cyclic garbage collector happened to close it. It is off here."""
    app = build_app(worker)

    def after_first_text(body: list[bytes]) -> bool:
        return any(c.get("text", "").strip() != payload()["prompt"].strip() for c in chunks_of(body))

    gc.disable()
    try:
        body = call(app, [{"type": "http.request", "body": json.dumps(payload()).encode(), "more_body": False}],
                    leave=after_first_text)
        left = time.monotonic()
        while worker.batcher._running and time.monotonic() - left < FREED_WITHIN_S:
            time.sleep(0.01)
        waited = time.monotonic() - left
    finally:
        gc.enable()
    assert not worker.batcher._running, f"the model was still generating {FREED_WITHIN_S} s after its client left"
    sent = chunks_of(body)
    assert sent and all(c["error_code"] == 0 and not c["done"] for c in sent), sent[-1:]
    assert worker.queue_length() == 0 and waited < FREED_WITHIN_S


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(worker: TwistModelWorker) -> None:
    """A 20 MB prompt took 15-23 s of tokenizing under the model's lock before it was refused."""
    start = time.monotonic()
    chunks = [json.loads(c.rstrip(b"\0")) for c in worker.stream_bytes(payload(8, prompt="red, " * 4_000_000))]
    assert time.monotonic() - start < 5
    assert chunks[-1]["error_code"] == 1 and "the model's context is 2048: shorten the question" in chunks[-1]["text"]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_one_image_is_refused_as_it_arrives(worker: TwistModelWorker, declared: bool) -> None:
    """A 200 MB body was read whole (+760 MB) before it was found not to decode."""
    piece = b" " * (4 << 20)
    pieces = MAX_REQUEST_BYTES // len(piece) + 2
    messages = [{"type": "http.request", "body": piece, "more_body": True} for _ in range(pieces)]
    headers = [(b"content-length", str(pieces * len(piece)).encode())] if declared else []
    chunks = chunks_of(call(build_app(worker), messages, headers=headers))
    assert chunks[-1]["error_code"] == 1 and "the request body is" in chunks[-1]["text"]
    assert f"the limit is {MAX_REQUEST_BYTES >> 20} MiB" in chunks[-1]["text"]


def test_a_deeply_nested_body_gets_an_error_chunk(worker: TwistModelWorker) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    chunks = chunks_of(call(build_app(worker), [{"type": "http.request", "body": body, "more_body": False}]))
    assert chunks == [{"text": "bad request: the request's JSON is nested too deeply", "error_code": 1}]


def test_a_client_gone_mid_upload_is_no_error(worker: TwistModelWorker) -> None:
    """Each one left a 60-line ClientDisconnect traceback in the worker's log."""
    call(build_app(worker), [{"type": "http.request", "body": b'{"prompt": "', "more_body": True},
                             {"type": "http.disconnect"}])
    assert worker.queue_length() == 0


def test_a_lone_surrogate_is_named_as_the_clients_problem(worker: TwistModelWorker) -> None:
    body = json.dumps(payload(4, prompt="USER: hi \ud800 ASSISTANT:")).encode()
    chunks = chunks_of(call(build_app(worker), [{"type": "http.request", "body": body, "more_body": False}]))
    assert chunks[-1]["error_code"] == 1 and "bad request: prompt holds a lone surrogate" in chunks[-1]["text"]


# ----- the client side: a worker that misbehaves on the wire -----
def fake_worker(talk: Callable[[Callable[[bytes], None]], None]) -> Iterator[str]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1 << 16)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                talk(lambda data: conn.sendall(b"%x\r\n%s\r\n" % (len(data), data)))
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def forever(data: bytes, first: bytes = b"") -> Callable[[Callable[[bytes], None]], None]:
    def talk(send: Callable[[bytes], None]) -> None:
        if first:
            send(first)
        for _ in range(600):
            send(data)
            time.sleep(0.1)
    return talk


def big_chunk(send: Callable[[bytes], None]) -> None:
    send(b'{"text": "')
    for _ in range(40):
        send(b"x" * (1 << 20))


FIRST = b'{"text": "a", "error_code": 0}\0'


@pytest.mark.parametrize(("talk", "expected"), [
    (forever(b"\0"), "did not finish its answer in 2 s"),  # our worker's own keep-alive, forever
    (forever(b" ", first=FIRST), "sent no chunk for 1 s mid-answer"),  # a byte at a time
    (big_chunk, "sent a chunk over 8388608 bytes"),
], ids=["keep-alive forever", "drip", "a 40 MB chunk"])  # fmt: skip
def test_the_client_gives_up_on_a_worker_that_never_finishes(talk: Callable, expected: str) -> None:
    """The 60 s timeout was per read: keep-alive NULs or a byte every 10 s held the playground for ever."""
    address = next(iter(fake_worker(talk)))
    start = time.monotonic()
    chunks = list(stream_chunks(address, {}, chunk_deadline=1.0, answer_deadline=2.0))
    assert time.monotonic() - start < 10
    assert chunks[-1]["error_code"] == 1 and expected in chunks[-1]["text"], chunks[-1]


def test_chunks_split_in_linear_time() -> None:
    """``iter_lines`` rescanned its buffer for each piece: one 8 MB chunk took 1.8 s, 150 MB over 3 minutes."""
    pieces = [b"x" * 1024] * (16 << 10) + [b"\0"]
    start = time.monotonic()
    assert [len(c) for c in split_chunks(pieces, max_chunk=32 << 20)] == [16 << 20]
    assert time.monotonic() - start < 2

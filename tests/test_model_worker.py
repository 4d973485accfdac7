"""TWIST in LLaVA's serving stack, on loopback: LLaVA's own controller, our TWIST worker (a delta on the tiny base)
and LLaVA's own worker on the same base, driven as LLaVA's clients drive them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from llava.conversation import conv_templates, default_conversation
from PIL import Image
from transformers import AutoTokenizer

from llava_twist.model.builder import convert_llava_to_twist, save_twist_checkpoint, save_twist_delta
from llava_twist.serve.inference import load_model
from llava_twist.serve.model_worker import TwistModelWorker
from llava_twist.serve.worker_protocol import (
    RequestError,
    list_models,
    parse_request,
    stream_chunks,
    worker_address,
    worker_status,
)

sys.path.insert(0, str(Path(__file__).parent))
from deepspeed_shm import free_port  # noqa: E402

TWIST_NAME = "llava-v1.5-tiny-twist"
PLAIN_NAME = "llava-v1.5-tiny"
LIMIT = 2
STARTUP_S = 120
REPO = Path(__file__).resolve().parents[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            requests.post(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer in {STARTUP_S} s:\n{log.read_text()[-3000:]}")


class Stack:
    """Processes started for one test module, stopped at its end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.controller = ""

    def start(self, name: str, args: list[str], ready: str) -> subprocess.Popen:
        log = self.folder / f"{name}.log"
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": path}  # this checkout's code, from the working folder the servers log to
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=self.folder, env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT)  # LLaVA's servers write their logs to the working folder
        self.procs.append(proc)
        wait_for(ready, proc, log)
        return proc

    def worker(self, name: str, module: str, model: list[str], extra: list[str] = ()) -> tuple[str, subprocess.Popen]:
        port = free_port()
        address = f"http://127.0.0.1:{port}"
        proc = self.start(name, [module, "--host", "127.0.0.1", "--port", str(port), "--worker-address", address,
                                 "--controller-address", self.controller, "--device", "cpu", *model, *extra],
                          address + "/worker_get_status")
        return address, proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def twist_of(base: Path, folder: Path) -> tuple[Path, Path]:
    """A full TWIST checkpoint and a grounding-only delta of ``base`` whose grounding experts differ from the frozen
    layers, and whose router sends every prompt down the frozen route unless asked otherwise (what a LLaVA client
    that knows nothing of routes must get: the original model). The full checkpoint serves in float16 beside
    LLaVA's worker (a delta's base fingerprint is taken in the dtype the base was made in: fp32 here)."""
    model = convert_llava_to_twist(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".twist_expert." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
            if "twist_router" in name:
                p.fill_(-10.0 if name.endswith("bias") else 0.0)
    full = save_twist_checkpoint(model, folder / TWIST_NAME, AutoTokenizer.from_pretrained(base, use_fast=False))
    return full, save_twist_delta(model, folder / f"{TWIST_NAME}-delta")


@pytest.fixture(scope="module")
def stack(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("serving")
    full, delta = twist_of(tiny_llava, folder)
    s = Stack(folder)
    port = free_port()
    s.controller = f"http://127.0.0.1:{port}"
    try:
        s.start("controller", ["llava.serve.controller", "--host", "127.0.0.1", "--port", str(port)],
                s.controller + "/list_models")
        twist, _ = s.worker("twist", "llava_twist.serve.model_worker",
                            ["--model-path", str(full)],
                            ["--dtype", "float16", "--limit-model-concurrency", str(LIMIT)])
        plain, _ = s.worker("plain", "llava.serve.model_worker", ["--model-path", str(tiny_llava)])
        yield {"controller": s.controller, "twist": twist, "plain": plain, "delta": str(delta),
               "base": str(tiny_llava), "folder": str(folder)}
    finally:
        s.stop()


def image_b64(size: tuple[int, int] = (48, 40)) -> str:
    image = Image.new("RGB", size, (240, 240, 240))
    image.paste((220, 30, 30), (8, 8, 24, 24))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def image_payload(question: str, **extra: object) -> dict:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return {"prompt": conv.get_prompt(), "images": [image_b64()], "temperature": 0.0, "top_p": 1.0,
            "max_new_tokens": 24, "stop": conv.sep2, **extra}


def final(chunks: list[dict]) -> dict:
    assert chunks, "no chunk streamed"
    return chunks[-1]


# ----- the request fields -----
@pytest.mark.parametrize(("params", "named"), [
    ("a prompt", "JSON object"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
    ({"prompt": "hi", "max_new_tokens": 2.5}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "top_p": 2}, "top_p"),
    ({"prompt": "hi", "images": "abc"}, "images"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "twist_route": "sideways"}, "twist_route"),
])  # fmt: skip
def test_bad_fields_are_named(params: object, named: str) -> None:
    with pytest.raises(RequestError, match=named):
        parse_request(params)


def test_llava_clients_fields_keep_their_meaning() -> None:
    request = parse_request({"prompt": "hi", "temperature": 0.0005, "max_new_tokens": 5000, "stop": "</s>"})
    assert request.greedy and request.max_new_tokens == 1024 and request.stop == "</s>" and request.route == "auto"


def test_thirty_concurrent_requests_none_lost_none_mixed(tiny_llava: Path) -> None:
    """A burst against the worker (limit 8): every request gets its own answer, the one it gets alone, in batches
    of at most 8, and the queue length the controller reads returns to 0."""
    worker = TwistModelWorker(load_model(str(tiny_llava), device="cpu"), "m", "http://w", "http://c",
                              limit_model_concurrency=8)
    payloads = [image_payload(f"What is in the picture, number {i}?", max_new_tokens=4 + i % 5,
                              twist_route=("auto", "grounding", "frozen")[i % 3]) for i in range(30)]

    def answer(payload: dict) -> dict:
        chunks = [json.loads(c[:-1]) for c in worker.stream_bytes(payload) if c != b"\0"]
        assert chunks and all(c["error_code"] == 0 for c in chunks) and chunks[-1]["done"], chunks[-1:]
        return chunks[-1]

    alone = [answer(p) for p in payloads]
    seen: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(worker.queue_length())
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    with ThreadPoolExecutor(len(payloads)) as pool:
        burst = list(pool.map(answer, payloads))
    done.set()
    poller.join()
    for payload, one, many in zip(payloads, alone, burst, strict=True):
        assert many["text"].startswith(payload["prompt"])  # its own prompt, none mixed up
        assert (many["text"], many["twist_route"], many["router_prob"]) == (
            one["text"], one["twist_route"], one["router_prob"])
    assert max(seen) > 8 and max(worker.batcher.batch_sizes) == 8  # the burst waited, then shared generations
    assert worker.queue_length() == 0


def test_chunks_carry_steps_and_boxes_in_pixels(tiny_llava: Path) -> None:
    worker = TwistModelWorker(load_model(str(tiny_llava), device="cpu"), "m", "http://w", "http://c")
    text = "Step 1: the red square [0.25, 0.25, 0.50, 0.50]\nAnswer: [0.25, 0.25, 0.50, 0.50]"
    chunk = worker.chunk("PROMPT ", text, Image.new("RGB", (200, 100)), True)
    assert chunk["text"] == "PROMPT " + text and chunk["error_code"] == 0
    assert [s["index"] for s in chunk["steps"]] == [1]
    # the padded square frame: 200 px wide, a 100 px image centred in it
    assert chunk["steps"][0]["boxes_xyxy_px"] == [[50.0, 0.0, 100.0, 50.0]]
    assert [b["label"] for b in chunk["boxes"]] == ["Step 1", "Answer"]


def test_a_client_gone_before_its_answer_frees_its_place(tiny_llava: Path) -> None:
    """LLaVA's web UI gives up after 10 s: a request whose client left before the first chunk must not keep
    its place (after ``limit`` of them the worker would admit no one)."""
    from llava_twist.serve.model_worker import build_app

    worker = TwistModelWorker(load_model(str(tiny_llava), device="cpu"), "m", "http://w", "http://c",
                              limit_model_concurrency=2)
    app = build_app(worker)
    body = json.dumps(image_payload("What is it?", max_new_tokens=4)).encode()
    scope = {"type": "http", "method": "POST", "path": "/worker_generate_stream", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
             "server": ("test", 80), "client": ("client", 1), "root_path": ""}

    async def gone_client() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            pass

        await app(scope, receive, send)

    async def three() -> None:
        for _ in range(3):
            await asyncio.wait_for(gone_client(), timeout=60)

    asyncio.run(three())
    assert worker.queue_length() == 0


# ----- the stack -----
@pytest.mark.slow
def test_controller_lists_both_workers(stack: dict[str, str]) -> None:
    assert set(list_models(stack["controller"])) >= {TWIST_NAME, PLAIN_NAME}
    assert worker_address(stack["controller"], TWIST_NAME) == stack["twist"]
    assert worker_address(stack["controller"], PLAIN_NAME) == stack["plain"]


@pytest.mark.slow
@pytest.mark.parametrize("model", [TWIST_NAME, PLAIN_NAME])
def test_llava_test_message_client_streams_from_each(stack: dict[str, str], model: str) -> None:
    """The client as LLaVA's ``llava/serve/test_message.py`` writes it: through the controller, a text-only
    conversation, sampled, read chunk by chunk on null bytes."""
    controller = stack["controller"]
    requests.post(controller + "/refresh_all_workers")
    models = requests.post(controller + "/list_models").json()["models"]
    assert model in models
    address = requests.post(controller + "/get_worker_address", json={"model": model}).json()["address"]
    conv = default_conversation.copy()
    conv.append_message(conv.roles[0], "Tell me a story.")
    prompt = conv.get_prompt()
    payload = {"model": model, "prompt": prompt, "max_new_tokens": 8, "temperature": 0.7, "stop": conv.sep}
    response = requests.post(address + "/worker_generate_stream", headers={"User-Agent": "LLaVA Client"},
                             json=payload, stream=True)
    outputs = []
    for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\0"):
        if chunk:
            data = json.loads(chunk.decode("utf-8"))
            assert data["error_code"] == 0 and data["text"].startswith(prompt.rstrip())  # LLaVA's strips a stop
            outputs.append(data["text"].split(conv.sep)[-1])
    assert outputs


@pytest.mark.slow
def test_understanding_prompt_is_the_plain_workers_answer(stack: dict[str, str]) -> None:
    payload = image_payload("What color is the square?")
    plain = [c for c in stream_chunks(stack["plain"], payload)]
    twist = [c for c in stream_chunks(stack["twist"], payload)]
    assert final(plain)["error_code"] == 0 and final(twist)["error_code"] == 0
    assert final(twist)["text"] == final(plain)["text"]
    assert len(final(twist)["text"]) > len(payload["prompt"])
    assert final(twist)["twist_route"] == "frozen" and final(twist)["route_forced"] is False
    assert final(twist)["router_prob"] < 0.01


@pytest.mark.slow
def test_grounding_route_streams_its_own_answer_and_parse(stack: dict[str, str]) -> None:
    payload = image_payload("Where is the red square? Answer step by step.", twist_route="grounding")
    chunks = list(stream_chunks(stack["twist"], payload))
    assert len(chunks) > 1 and all(c["error_code"] == 0 for c in chunks)
    assert all(c["twist_route"] == "grounding" and c["route_forced"] for c in chunks)
    assert chunks[-1]["done"] and not any(c["done"] for c in chunks[:-1])
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # each chunk extends the last
    assert all("steps" in c and "boxes" in c for c in chunks)
    plain = final(list(stream_chunks(stack["plain"], image_payload("Where is the red square? Answer step by step."))))
    assert chunks[-1]["text"] != plain["text"]  # the grounding experts, not the original layers


@pytest.mark.slow
def test_concurrency_limit_plus_three_all_complete(stack: dict[str, str]) -> None:
    payloads = [image_payload(f"What is in the picture, number {i}?", max_new_tokens=16) for i in range(LIMIT + 3)]
    seen: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(worker_status(stack["twist"])["queue_length"])
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    with ThreadPoolExecutor(len(payloads)) as pool:
        results = list(pool.map(lambda p: list(stream_chunks(stack["twist"], p)), payloads))
    done.set()
    poller.join()
    assert all(r and r[-1]["error_code"] == 0 and r[-1]["done"] for r in results)
    assert len({r[-1]["text"] for r in results}) == len(payloads)  # each its own answer, none lost
    assert max(seen) >= 1 and worker_status(stack["twist"])["queue_length"] == 0


@pytest.mark.slow
def test_frozen_answers_under_concurrency_are_llavas(stack: dict[str, str]) -> None:
    """Eight clients at once on each worker: the TWIST worker (auto, frozen by its router) batches them, LLaVA's
    runs them on threads; every answer is LLaVA's worker's answer to the same request, and the same as alone."""
    payloads = [image_payload(q) for q in ("What color is the square?", "Where is the red square?",
                                           "Describe the picture.", "How many squares are there?",
                                           "What is in the top left corner?", "Is the square large or small?",
                                           "Name every colour you see.", "What is this?")]

    def burst(address: str) -> list[dict]:
        with ThreadPoolExecutor(len(payloads)) as pool:
            return list(pool.map(lambda p: final(list(stream_chunks(address, p))), payloads))

    alone = [final(list(stream_chunks(stack["twist"], p))) for p in payloads]
    twist, plain = burst(stack["twist"]), burst(stack["plain"])
    for one, ours, theirs in zip(alone, twist, plain, strict=True):
        assert ours["error_code"] == 0 and theirs["error_code"] == 0
        assert ours["text"] == theirs["text"] == one["text"]
        assert ours["twist_route"] == "frozen"


@pytest.mark.slow
@pytest.mark.parametrize(("payload", "named"), [
    ({"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "images": []}, "1 <image> token"),
    ({"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "images": [base64.b64encode(b"nope").decode()]},
     "cannot be decoded"),
    ({"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "images": ["%%%"]}, "not valid base64"),
    ({"prompt": "USER: " + "tell me more " * 2000 + " ASSISTANT:"}, "context"),
    ({"prompt": "USER: hi ASSISTANT:", "temperature": "hot"}, "temperature"),
    ({"prompt": "USER: hi ASSISTANT:", "twist_route": "sideways"}, "twist_route"),
    ({"prompt": ["USER: hi"]}, "prompt"),
])  # fmt: skip
def test_bad_requests_get_an_error_chunk_and_the_worker_goes_on(stack: dict[str, str], payload: dict,
                                                                named: str) -> None:
    chunks = list(stream_chunks(stack["twist"], payload))
    assert len(chunks) == 1 and chunks[0]["error_code"] == 1 and named in chunks[0]["text"], chunks
    after = list(stream_chunks(stack["twist"], image_payload("What color is the square?", max_new_tokens=4)))
    assert after[-1]["error_code"] == 0 and after[-1]["done"]


@pytest.mark.slow
def test_a_body_that_is_not_json_gets_an_error_chunk(stack: dict[str, str]) -> None:
    response = requests.post(stack["twist"] + "/worker_generate_stream", data=b"{not json", timeout=30)
    chunk = json.loads(response.content.rstrip(b"\0"))
    assert chunk["error_code"] == 1 and "JSON object" in chunk["text"]


@pytest.mark.slow
def test_workers_stopped_mid_stream(stack: dict[str, str], tiny_llava: Path) -> None:
    """A worker stopped by SIGTERM and one killed by SIGKILL mid-answer: each client gets an error chunk, not a
    hang; after their heart beats stop, the controller drops both (one wait for its expiry, for both)."""
    from llava.constants import CONTROLLER_HEART_BEAT_EXPIRATION

    s = Stack(Path(stack["folder"]))
    s.controller = stack["controller"]
    names = {how: f"doomed-{how.lower()}" for how in ("SIGTERM", "SIGKILL")}
    try:
        for how, name in names.items():
            address, proc = s.worker(name, "llava_twist.serve.model_worker", ["--model-path", stack["delta"],
                                     "--model-base", stack["base"], "--model-name", name])
            assert name in list_models(stack["controller"])
            chunks = []
            for chunk in stream_chunks(address, image_payload("Describe it.", max_new_tokens=1000, stop=None,
                                                              twist_route="grounding")):
                chunks.append(chunk)
                if len(chunks) == 2:
                    proc.send_signal(getattr(signal, how))
            assert chunks[-1]["error_code"] == 1
            assert ("shutting down" if how == "SIGTERM" else "went away") in chunks[-1]["text"]
            proc.wait(timeout=60)
        deadline = time.monotonic() + 2 * CONTROLLER_HEART_BEAT_EXPIRATION + 10
        listed = set(names.values())
        while listed and time.monotonic() < deadline:  # the controller's own expiry, without a refresh asked of it
            listed &= set(requests.post(stack["controller"] + "/list_models").json()["models"])
            time.sleep(1)
        assert not listed, f"the controller still lists {sorted(listed)} after its heart-beat expiry"
    finally:
        s.stop()


# ----- the playground as the stack's client -----
def scene() -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image_b64())))


@pytest.mark.slow
def test_playground_compares_the_twist_worker_with_the_plain_one(stack: dict[str, str]) -> None:
    from playground import app

    backend = app.create_remote_backend(stack["controller"])
    assert TWIST_NAME in backend.description and PLAIN_NAME in backend.description
    app.build_demo(backend)  # the UI builds with the controller's models to pick from
    updates = list(backend.run(scene(), "What color is the square?", app.ROUTE_LABELS["auto"], True, 0.0, 16,
                               TWIST_NAME, PLAIN_NAME))
    twist, plain = updates[-1][3], updates[-1][7]
    assert twist["done"] and plain["done"] and twist["text"]
    assert twist["route"] == "frozen" and plain["route"] is None  # LLaVA's worker knows no routes
    assert twist["text"] == plain["text"]  # the router kept the original computation


@pytest.mark.slow
def test_playground_names_the_model_that_went_away(stack: dict[str, str]) -> None:
    import gradio as gr

    from playground import app

    s = Stack(Path(stack["folder"]))
    s.controller = stack["controller"]
    name = "going-away"
    try:
        _, proc = s.worker(name, "llava_twist.serve.model_worker", ["--model-path", stack["delta"],
                           "--model-base", stack["base"], "--model-name", name])
        backend = app.create_remote_backend(stack["controller"])
        updates = backend.run(scene(), "Describe it.", app.ROUTE_LABELS["grounding"], False, 0.0, 1000, name)
        next(updates)
        proc.kill()
        with pytest.raises(gr.Error, match=f"model {name}: the worker at .* went away mid-answer"):
            for _ in updates:
                pass
        proc.wait(timeout=30)
        with pytest.raises(gr.Error, match=f"model {name}: the worker at .* cannot be reached"):
            list(backend.run(scene(), "Describe it.", app.ROUTE_LABELS["auto"], False, 0.0, 8, name))
    finally:
        s.stop()

"""A model worker for LLaVA's serving stack that serves TWIST (and plain LLaVA-1.5) checkpoints.

    python -m llava.serve.controller --host 0.0.0.0 --port 10000
    python -m llava_twist.serve.model_worker --controller-address http://localhost:10000 --port 40000 \\
        --worker-address http://localhost:40000 --model-path ./checkpoints/llava-v1.5-7b-twist

It speaks LLaVA 1.2.2's worker protocol (registration, heart beats, ``/worker_get_status``,
``/worker_generate_stream`` with null-delimited JSON chunks), so LLaVA's controller dispatches to it and LLaVA's
clients stream from it. A request may name ``twist_route`` (``auto``, ``frozen``, ``grounding``); every chunk also
carries the route taken, the router's probability and the steps and boxes parsed so far. Loading goes through
:func:`llava_twist.model.builder.load_pretrained_model`: a TWIST checkpoint, a TWIST delta with ``--model-base``,
or a plain LLaVA-1.5 folder. Requests that arrive while the model is busy are generated together in one call
(:class:`llava_twist.serve.batching.Batcher`; mixed routes allowed, each request streams its own tokens):
``--limit-model-concurrency`` bounds how many generate together, ``--limit-queue`` how many wait beyond those (more
are refused with an error chunk).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import requests
import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves the endpoints' annotations here
from fastapi.responses import Response, StreamingResponse
from PIL import Image
from starlette.requests import ClientDisconnect

from llava_twist.serve.batching import Batcher, QueueFull
from llava_twist.serve.generation import NO_ROUTE, GenerationSettings, RouteRow
from llava_twist.serve.loading import LoadedModel, load_model
from llava_twist.serve.result import InferenceError, InferenceResult, result_from_text
from llava_twist.serve.worker_protocol import (
    CHUNK_END,
    RequestError,
    WorkerRequest,
    encode_chunk,
    error_chunk,
    parse_request,
)
from scout_data.images import ImageError, read_image
from scout_data.inputs import MAX_REQUEST_BYTES, size_problem

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KEEP_ALIVE_S = 2.0
DEFAULT_LIMIT_QUEUE = 64
DEFAULT_BATCH_WAIT_MS = 50
STOPPING = "the worker is shutting down; ask again (the controller will send you to another worker)"


def decode_image(data: str, index: int) -> Image.Image:
    """The RGB picture in a request's base64 string (:func:`llava_twist.serve.images.read_image`), or a
    :class:`RequestError` naming which image is bad."""
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)  # line-wrapped base64 too, as LLaVA's
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"image {index} is not valid base64 ({exc})") from exc
    try:
        return read_image(raw, f"image {index}")
    except ImageError as exc:
        raise RequestError(str(exc).replace("cannot be read as an image", "cannot be decoded as an image")) from None


class TwistModelWorker:
    """One loaded model behind LLaVA's worker protocol: status, registration and heart beats, streaming."""

    def __init__(
        self,
        loaded: LoadedModel,
        model_name: str,
        worker_addr: str,
        controller_addr: str,
        limit_model_concurrency: int = 5,
        stream_interval: int = 1,
        limit_queue: int = DEFAULT_LIMIT_QUEUE,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        batched_decode: bool = False,
    ) -> None:
        self.loaded = loaded
        self.model_name = model_name
        self.worker_addr = worker_addr
        self.controller_addr = controller_addr.rstrip("/")
        self.limit = limit_model_concurrency
        self.stream_interval = max(1, stream_interval)
        self.stopping = threading.Event()
        self.batcher = Batcher(loaded, max_batch=limit_model_concurrency, max_waiting=limit_queue,
                               gather_s=batch_wait_ms / 1000, batched_products=batched_decode)

    # ----- controller side -----
    def status(self) -> dict[str, Any]:
        return {"model_names": [self.model_name], "speed": 1, "queue_length": self.queue_length()}

    def queue_length(self) -> int:
        """Requests generating or waiting, as LLaVA's worker counts them for the controller."""
        return self.batcher.queue_length()

    def register(self) -> None:
        response = requests.post(self.controller_addr + "/register_worker", timeout=10, json={
            "worker_name": self.worker_addr, "check_heart_beat": True, "worker_status": self.status()})
        response.raise_for_status()

    def send_heart_beat(self) -> None:
        """Tell the controller this worker lives (re-registering when it has forgotten it); quiet on failure."""
        try:
            response = requests.post(self.controller_addr + "/receive_heart_beat", timeout=5, json={
                "worker_name": self.worker_addr, "queue_length": self.queue_length()})
            if not response.json().get("exist", False):
                self.register()
        except (requests.RequestException, ValueError) as exc:
            print(f"heart beat to {self.controller_addr} failed: {exc}", file=sys.stderr)

    def start_heart_beats(self, interval_s: float) -> threading.Thread:
        def beat() -> None:
            while not self.stopping.wait(interval_s):
                self.send_heart_beat()

        thread = threading.Thread(target=beat, name="worker-heart-beat", daemon=True)
        thread.start()
        return thread

    # ----- requests -----
    def settings(self, request: WorkerRequest) -> GenerationSettings:
        greedy = request.greedy
        return GenerationSettings(temperature=0.0 if greedy else request.temperature,
                                  top_p=None if greedy else request.top_p,
                                  max_new_tokens=request.max_new_tokens, route=request.route)

    def chunk(self, prompt: str, text: str, image: Image.Image | None, done: bool,
              final: InferenceResult | None = None, route_row: RouteRow = NO_ROUTE) -> dict[str, Any]:
        """``text`` as LLaVA's worker sends it (the prompt, then the answer so far) with the route and the parse."""
        if final is not None:
            route, prob, forced = final.route, final.router_prob, final.route_forced
        else:
            route, prob, forced = route_row
        size = image.size if image is not None else (1, 1)
        parsed = final or result_from_text(text.strip(), size, self.loaded.default_box_frame())
        body = parsed.to_json()
        return {
            "text": prompt + text, "error_code": 0, "done": done,
            "twist_route": route, "router_prob": prob, "route_forced": forced, "box_frame": body["box_frame"],
            "steps": body["steps"], "answer": body["answer"], "boxes": body["boxes"] if image is not None else [],
        }

    def generate_stream(self, request: WorkerRequest) -> Iterator[dict[str, Any]]:
        """Chunks for one checked request; errors a user can fix raise :class:`RequestError`. The generation runs on
        the batcher's thread, with the requests that wait beside it; a client that goes away leaves its batch."""
        from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN

        tokens = request.prompt.count(DEFAULT_IMAGE_TOKEN)
        if tokens != len(request.images):
            raise RequestError(f"the prompt has {tokens} {DEFAULT_IMAGE_TOKEN} token(s) and the request "
                               f"{len(request.images)} image(s); send one image per {DEFAULT_IMAGE_TOKEN} token")
        if len(request.images) > 1:
            raise RequestError(f"{len(request.images)} images: this worker answers about one image per request")
        image = decode_image(request.images[0], 0) if request.images else None
        prompt = request.prompt
        if image is not None and getattr(self.loaded.model.config, "mm_use_im_start_end", False):
            prompt = prompt.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN
                                    + DEFAULT_IM_END_TOKEN)
        try:
            yield from self._chunks(request, prompt, image)
        except QueueFull as exc:
            raise RequestError(f"the worker is busy: {exc}") from None
        except InferenceError as exc:
            raise RequestError(str(exc)) from exc

    def _chunks(self, request: WorkerRequest, prompt: str, image: Image.Image | None) -> Iterator[dict[str, Any]]:
        if self.stopping.is_set():
            yield error_chunk(STOPPING)
            return
        text, pieces = "", 0
        stream = self.batcher.stream(prompt, image, self.settings(request), stop=request.stop, idle_s=KEEP_ALIVE_S)
        try:
            for item in stream:
                if item is None:
                    if self.stopping.is_set():
                        yield error_chunk(STOPPING)
                        return
                    yield {}  # waiting for the model: an empty chunk keeps the client's read alive
                    continue
                if isinstance(item, InferenceResult):
                    yield self.chunk(request.prompt, text, image, True, final=item)
                    return
                piece, route_row = item
                text += piece
                pieces += 1
                if self.stopping.is_set():
                    yield error_chunk(STOPPING)
                    return
                if pieces % self.stream_interval == 0:
                    yield self.chunk(request.prompt, text, image, False, route_row=route_row)
        finally:
            stream.close()  # a reader gone frees its place in the batch

    def stream_bytes(self, params: Any) -> Iterator[bytes]:
        """The response body: chunks, or one error chunk naming the problem (the worker goes on serving);
        ``params`` a :class:`RequestError` when the body could not be read as a request."""
        try:
            if isinstance(params, RequestError):
                raise params
            for chunk in self.generate_stream(parse_request(params)):
                yield encode_chunk(chunk) if chunk else CHUNK_END
        except RequestError as exc:
            yield encode_chunk(error_chunk(f"bad request: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a failed generation must reach the client as a chunk
            print(f"generation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            yield encode_chunk(error_chunk(f"generation failed on the worker: {type(exc).__name__}: {exc}"))


class GenerationResponse(StreamingResponse):
    """A worker's stream that, however it ends (a client gone mid-answer included), closes its body at once, so the
    request leaves its batch: Starlette leaves a sync body generator suspended when its client goes, and only the
    garbage collector would close it (and free the model) later."""

    def __init__(self, body: Iterator[bytes]) -> None:
        self.chunks = body  # (Response.body is the whole body of a plain response)
        super().__init__(body)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # a client gone is no failure of the worker's
            pass
        finally:
            while True:  # a step of the body may still run on a thread: close it once that step returns
                try:
                    await anyio.to_thread.run_sync(self.chunks.close)
                    break
                except ValueError:  # "generator already executing"
                    await anyio.sleep(0.01)


CLIENT_GONE = object()


async def read_request(request: Request) -> Any:
    """The request's JSON body, read up to :data:`~scout_data.inputs.MAX_REQUEST_BYTES` (one image and its
    conversation), or the :class:`RequestError` saying why not; :data:`CLIENT_GONE` when the client left before
    sending it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (problem := size_problem(int(declared), MAX_REQUEST_BYTES, "the request body")):
        return RequestError(f"{problem} (one image and its conversation)")
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if problem := size_problem(len(body), MAX_REQUEST_BYTES, "the request body"):
                return RequestError(f"{problem} (one image and its conversation)")
    except ClientDisconnect:
        return CLIENT_GONE
    try:
        return json.loads(body)
    except RecursionError:
        return RequestError("the request's JSON is nested too deeply")
    except ValueError:
        return RequestError("the body is not JSON; expected a JSON object")


def build_app(worker: TwistModelWorker) -> FastAPI:
    """The worker's FastAPI app (LLaVA's two worker endpoints)."""
    app = FastAPI()

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request) -> Response:
        params = await read_request(request)
        if params is CLIENT_GONE:
            return Response(status_code=400)  # nobody is there to read it
        # the request joins the batcher at its first chunk and leaves it when the response ends, however it ends
        return GenerationResponse(worker.stream_bytes(params))

    @app.post("/worker_get_status")
    async def get_status() -> dict[str, Any]:
        return worker.status()

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_twist.serve.model_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=21002)
    p.add_argument("--worker-address", default="http://localhost:21002")
    p.add_argument("--controller-address", default="http://localhost:21001")
    p.add_argument("--model-path", required=True, help="TWIST checkpoint, TWIST delta or LLaVA-1.5 folder (or hub id)")
    p.add_argument("--model-base", default=None, help="the LLaVA-1.5 base of a grounding-only TWIST delta")
    p.add_argument("--model-name", default=None, help="the name the controller lists (default: from the path)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights' dtype (auto: float16 on CUDA, float32 on CPU; LLaVA's worker uses float16)")
    p.add_argument("--multi-modal", action="store_true", help="accepted for LLaVA's flags; always multimodal")
    p.add_argument("--limit-model-concurrency", type=int, default=5,
                   help="requests generated together in one batch (LLaVA's flag: generations at once)")
    p.add_argument("--limit-queue", type=int, default=DEFAULT_LIMIT_QUEUE,
                   help="requests waiting beyond those; more are refused with an error chunk")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                   help="how long a request that finds the model idle waits for others to share its generation")
    p.add_argument("--batched-decode", action="store_true",
                   help="multiply a batch's decode rows in one product: about twice the burst's speed in float16 on "
                        "CPU, but a greedy answer may then leave its one-at-a-time text at a near tie (default: each "
                        "prompt's products as alone, so batched answers are the one-at-a-time ones)")
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--use-flash-attn", action="store_true")
    return p


def model_name_of(model_path: str, model_name: str | None) -> str:
    """The name LLaVA's worker would register (the folder, or ``parent_checkpoint-N``)."""
    from llava.mm_utils import get_model_name_from_path

    return model_name or get_model_name_from_path(model_path.rstrip("/"))


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn
    from llava.constants import WORKER_HEART_BEAT_INTERVAL

    args = build_parser().parse_args(argv)
    if args.limit_model_concurrency < 1 or args.stream_interval < 1 or args.limit_queue < 0 or not (
            0 <= args.batch_wait_ms <= 10_000):
        print("error: --limit-model-concurrency and --stream-interval must be at least 1, --limit-queue at least 0, "
              "--batch-wait-ms from 0 to 10000", file=sys.stderr)
        return 2
    load_kwargs: dict[str, Any] = {"load_8bit": args.load_8bit, "load_4bit": args.load_4bit}
    if args.use_flash_attn:
        load_kwargs["use_flash_attn"] = True
    try:
        loaded = load_model(args.model_path, args.model_base, args.device,
                            torch_dtype=DTYPES.get(args.dtype), **load_kwargs)
    except (InferenceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    worker = TwistModelWorker(loaded, model_name_of(args.model_path, args.model_name), args.worker_address,
                              args.controller_address, args.limit_model_concurrency, args.stream_interval,
                              args.limit_queue, args.batch_wait_ms, args.batched_decode)
    if not args.no_register:
        try:
            worker.register()
        except requests.RequestException as exc:
            print(f"error: cannot register with the controller at {args.controller_address}: {exc}", file=sys.stderr)
            return 2
        worker.start_heart_beats(WORKER_HEART_BEAT_INTERVAL)
    print(f"serving {worker.model_name} ({'TWIST' if loaded.is_twist else 'LLaVA'}, {loaded.dtype}, "
          f"{loaded.device}) at {args.worker_address}", flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            worker.stopping.set()  # streams in flight end with an error chunk instead of being cut
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(build_app(worker), host=args.host, port=args.port, log_level="warning")).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

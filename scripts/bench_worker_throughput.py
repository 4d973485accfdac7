"""Served throughput of the TWIST worker against LLaVA's own worker on the same base (tokens per second).

LLaVA's controller and both workers run on this machine (LLaVA's worker beats its heart to the controller on
every request), each worker on its own port, in float16 as LLaVA's worker loads. Greedy requests go round-robin
(LLaVA, TWIST frozen route, TWIST grounding route); each variant's median tokens per second is compared with
LLaVA's, measured in the same run (the machine is noisy). Compare the grounding route's slowdown with
``scripts/bench_twist_overhead.py``'s decode ratio.

    python scripts/bench_worker_throughput.py [--hidden 512 --layers 8 --repeats 7 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image
from transformers import AutoTokenizer

from llava_twist.model.builder import convert_llava_to_twist, save_twist_checkpoint
from llava_twist.serve.worker_protocol import stream_chunks
from llava_twist.tiny import TinyLlavaSpec, build_tiny_llava

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], ready: str, folder: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    module = args[0]
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            requests.post(ready, timeout=2)
            return proc
        except requests.RequestException:
            if proc.poll() is not None:
                raise SystemExit(f"error: {module} exited with {proc.returncode} while starting") from None
            time.sleep(0.5)
    raise SystemExit(f"error: {module} did not start in 300 s")


def start_worker(module: str, model: Path, controller: str, folder: Path, threads: int
                 ) -> tuple[str, subprocess.Popen]:
    address = f"http://127.0.0.1:{free_port()}"
    extra = ["--dtype", "float16"] if module.startswith("llava_twist") else []
    proc = start([module, "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--worker-address", address,
                  "--controller-address", controller, "--device", "cpu", "--model-path", str(model), *extra],
                 address + "/worker_get_status", folder, threads)
    return address, proc


def payload(new_tokens: int, route: str | None) -> dict:
    image = Image.new("RGB", (64, 48), (240, 240, 240))
    image.paste((220, 30, 30), (8, 8, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    body = {"prompt": "USER: <image>\nWhere is the red square? ASSISTANT:",
            "images": [base64.b64encode(buffer.getvalue()).decode()], "temperature": 0.0,
            "max_new_tokens": new_tokens, "stop": "</s>"}  # LLaVA's worker needs a stop string
    if route:
        body["twist_route"] = route
    return body


def tokens_per_second(address: str, body: dict, tokenizer) -> float:
    start = time.perf_counter()
    chunks = list(stream_chunks(address, body, read_timeout=600))
    elapsed = time.perf_counter() - start
    if not chunks or chunks[-1].get("error_code") != 0:
        raise SystemExit(f"error: {address} answered {chunks[-1] if chunks else 'nothing'}")
    answer = chunks[-1]["text"][len(body["prompt"]):]
    return max(1, len(tokenizer(answer, add_special_tokens=False).input_ids)) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per worker")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = TinyLlavaSpec(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                             num_attention_heads=max(1, args.hidden // 64))
        base = build_tiny_llava(folder / "llava-v1.5-bench", spec)
        tokenizer = AutoTokenizer.from_pretrained(base, use_fast=False)
        twist = save_twist_checkpoint(convert_llava_to_twist(base), folder / "llava-v1.5-bench-twist", tokenizer)
        procs = []
        try:
            port = free_port()
            controller = f"http://127.0.0.1:{port}"
            procs.append(start(["llava.serve.controller", "--host", "127.0.0.1", "--port", str(port)],
                               controller + "/list_models", folder, 1))
            llava, proc = start_worker("llava.serve.model_worker", base, controller, folder, args.threads)
            procs.append(proc)
            ours, proc = start_worker("llava_twist.serve.model_worker", twist, controller, folder, args.threads)
            procs.append(proc)
            variants = {"LLaVA worker": (llava, None), "TWIST frozen": (ours, "frozen"),
                        "TWIST grounding": (ours, "grounding")}
            for address, route in variants.values():  # warm-up
                tokens_per_second(address, payload(4, route), tokenizer)
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for r in range(args.repeats):
                for name, (address, route) in variants.items():
                    rates[name].append(tokens_per_second(address, payload(args.new_tokens, route), tokenizer))
                print(f"round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    baseline = statistics.median(rates["LLaVA worker"])
    print(f"hidden {args.hidden}, {args.layers} layers, float16 on CPU, {args.new_tokens} new tokens, "
          f"{args.repeats} rounds (median tokens/s; ratio = LLaVA's tokens/s over the variant's)")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:16s} {median:8.1f} tok/s   slowdown {baseline / median:.3f}x")


if __name__ == "__main__":
    main()

"""Served throughput of the TWIST worker against LLaVA's own worker on the same base, alone and under a burst.

LLaVA's controller and both workers run on this machine, each worker on its own port, in float16 as LLaVA's worker
loads. Two measurements, each in the same run for both workers (the machine is noisy: compare ratios):

* ``--clients 1`` (default): greedy requests one at a time, round-robin (LLaVA, TWIST frozen route, TWIST grounding
  route); each variant's median tokens per second against LLaVA's. Compare the grounding route's slowdown with
  ``scripts/bench_twist_overhead.py``'s decode ratio.
* ``--clients N``: N different greedy questions sent at once (a burst) to each worker, and the same N one at a time
  on ours; per worker the burst's wall time, total tokens per second and the p50/p95 time to first token, and
  whether every answer is the same text as its one-at-a-time answer and as LLaVA's worker's.

    python scripts/bench_worker_throughput.py [--hidden 512 --layers 8 --repeats 7 --new-tokens 64]
    python scripts/bench_worker_throughput.py --clients 8 [--rounds 3 --limit 8]
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
import threading
import time
from pathlib import Path

import requests
from PIL import Image
from transformers import AutoTokenizer

from llava_twist.model.builder import convert_llava_to_twist, save_twist_checkpoint
from llava_twist.serve.worker_protocol import stream_chunks
from llava_twist.tiny import TinyLlavaSpec, build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ("Where is the red square?", "What colour is the square?", "Describe the picture.",
             "How many squares are there?", "Is there anything left of the square?", "What is in the top left?",
             "Tell me about the background.", "Which shape is red?", "Where is the square, exactly?",
             "What would you call this image?", "Is the square large or small?", "Name every colour you see.")


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


def start_worker(module: str, model: Path, controller: str, folder: Path, threads: int, extra: list[str]
                 ) -> tuple[str, subprocess.Popen]:
    address = f"http://127.0.0.1:{free_port()}"
    proc = start([module, "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--worker-address", address,
                  "--controller-address", controller, "--device", "cpu", "--model-path", str(model), *extra],
                 address + "/worker_get_status", folder, threads)
    return address, proc


def payload(new_tokens: int, route: str | None, question: str = QUESTIONS[0]) -> dict:
    image = Image.new("RGB", (64, 48), (240, 240, 240))
    image.paste((220, 30, 30), (8, 8, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    body = {"prompt": f"USER: <image>\n{question} ASSISTANT:",
            "images": [base64.b64encode(buffer.getvalue()).decode()], "temperature": 0.0,
            "max_new_tokens": new_tokens, "stop": "</s>"}  # LLaVA's worker needs a stop string
    if route:
        body["twist_route"] = route
    return body


def ask(address: str, body: dict) -> tuple[str, float, float]:
    """(answer, seconds to its first text, seconds to its end) of one streamed request."""
    start = time.perf_counter()
    first, answer = None, ""
    for chunk in stream_chunks(address, body, read_timeout=600):
        if chunk.get("error_code") != 0:
            raise SystemExit(f"error: {address} answered {chunk}")
        answer = chunk["text"][len(body["prompt"]):]
        if first is None and answer:
            first = time.perf_counter() - start
    end = time.perf_counter() - start
    return answer, first if first is not None else end, end


def tokens(tokenizer, text: str) -> int:
    return max(1, len(tokenizer(text, add_special_tokens=False).input_ids))


def tokens_per_second(address: str, body: dict, tokenizer) -> float:
    answer, _, elapsed = ask(address, body)
    return tokens(tokenizer, answer) / elapsed


def burst(address: str, bodies: list[dict]) -> tuple[list[str], list[float], float]:
    """All ``bodies`` at once: (answers, times to first text, wall time of the burst)."""
    results: list[tuple[str, float, float] | None] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies) + 1)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = ask(address, bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if any(r is None for r in results):
        raise SystemExit(f"error: a client of {address} got no answer")
    return [r[0] for r in results], [r[1] for r in results], wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_single(args: argparse.Namespace, llava: str, ours: str, tokenizer) -> None:
    variants = {"LLaVA worker": (llava, None), "TWIST frozen": (ours, "frozen"),
                "TWIST grounding": (ours, "grounding")}
    for address, route in variants.values():  # warm-up
        tokens_per_second(address, payload(4, route), tokenizer)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats):
        for name, (address, route) in variants.items():
            rates[name].append(tokens_per_second(address, payload(args.new_tokens, route), tokenizer))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    baseline = statistics.median(rates["LLaVA worker"])
    print(f"hidden {args.hidden}, {args.layers} layers, float16 on CPU, {args.new_tokens} new tokens, "
          f"{args.repeats} rounds (median tokens/s; ratio = LLaVA's tokens/s over the variant's)")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:16s} {median:8.1f} tok/s   slowdown {baseline / median:.3f}x")


def run_burst(args: argparse.Namespace, llava: str, ours: str, tokenizer) -> None:
    questions = [QUESTIONS[i % len(QUESTIONS)] + (f" ({i // len(QUESTIONS)})" if i >= len(QUESTIONS) else "")
                 for i in range(args.clients)]
    ours_bodies = [payload(args.new_tokens, args.route, q) for q in questions]
    llava_bodies = [payload(args.new_tokens, None, q) for q in questions]
    for address, body in ((llava, llava_bodies[0]), (ours, ours_bodies[0])):  # warm-up
        ask(address, body)
    alone = [ask(ours, body) for body in ours_bodies]  # one at a time: the reference answers
    llava_alone = [ask(llava, body)[0] for body in llava_bodies]
    rows: dict[str, list[tuple[float, float, list[float]]]] = {"LLaVA worker": [], "TWIST one at a time": [],
                                                                 "TWIST": []}
    same_alone, same_llava, llava_same_alone = [], [], []
    for r in range(args.rounds):
        answers, firsts, wall = burst(llava, llava_bodies)
        rows["LLaVA worker"].append((wall, sum(tokens(tokenizer, a) for a in answers) / wall, firsts))
        llava_same_alone.append(sum(a == b for a, b in zip(answers, llava_alone, strict=True)))
        start, firsts, answers_seq = time.perf_counter(), [], []
        for body in ours_bodies:  # the same requests one at a time: each waits for the ones before it
            answer, first, took = ask(ours, body)
            firsts.append(time.perf_counter() - start - took + first)
            answers_seq.append(answer)
        wall = time.perf_counter() - start
        rows["TWIST one at a time"].append((wall, sum(tokens(tokenizer, a) for a in answers_seq) / wall, firsts))
        answers, firsts, wall = burst(ours, ours_bodies)
        rows["TWIST"].append((wall, sum(tokens(tokenizer, a) for a in answers) / wall, firsts))
        same_alone.append(sum(a == b[0] for a, b in zip(answers, alone, strict=True)))
        same_llava.append(sum(a == b for a, b in zip(answers, llava_alone, strict=True)))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"hidden {args.hidden}, {args.layers} layers, float16 on CPU, {args.clients} clients, {args.new_tokens} "
          f"new tokens, our worker --limit-model-concurrency {args.limit}{' --batched-decode' * args.batched_decode}, "
          f"route {args.route or 'auto'}, "
          f"{args.rounds} rounds (medians)")
    wall = {name: statistics.median(w for w, _, _ in values) for name, values in rows.items()}
    for name, values in rows.items():
        firsts = [f for _, _, fs in values for f in fs]
        print(f"{name:20s} burst {wall[name]:7.2f} s  {statistics.median(t for _, t, _ in values):8.1f} tok/s  "
              f"first token p50 {percentile(firsts, 0.5):6.2f} s  p95 {percentile(firsts, 0.95):6.2f} s")
    print(f"TWIST batched vs one at a time: {wall['TWIST one at a time'] / wall['TWIST']:.2f}x faster; "
          f"vs LLaVA's worker: {wall['LLaVA worker'] / wall['TWIST']:.2f}x faster")
    print(f"answers identical to their one-at-a-time answer: TWIST {min(same_alone)}/{args.clients}, LLaVA's worker "
          f"{min(llava_same_alone)}/{args.clients}; TWIST's identical to LLaVA's worker's: "
          f"{min(same_llava)}/{args.clients} (fewest over the rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="rounds of the one-client measurement")
    parser.add_argument("--clients", type=int, default=1, help="concurrent clients of a burst; 1: one at a time")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per worker (--clients above 1)")
    parser.add_argument("--limit", type=int, default=8, help="our worker's --limit-model-concurrency")
    parser.add_argument("--route", default=None, help="twist_route of the burst's requests (default: auto)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per worker")
    parser.add_argument("--batched-decode", action="store_true", help="our worker's --batched-decode")
    args = parser.parse_args()
    if args.clients < 1 or args.rounds < 1 or args.limit < 1:
        parser.error("--clients, --rounds and --limit must be at least 1")

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
            llava, proc = start_worker("llava.serve.model_worker", base, controller, folder, args.threads,
                                       ["--limit-model-concurrency", str(max(args.clients, 5))])
            procs.append(proc)
            ours, proc = start_worker("llava_twist.serve.model_worker", twist, controller, folder, args.threads,
                                      ["--dtype", "float16", "--limit-model-concurrency", str(args.limit),
                                       *(["--batched-decode"] if args.batched_decode else [])])
            procs.append(proc)
            if args.clients == 1:
                run_single(args, llava, ours, tokenizer)
            else:
                run_burst(args, llava, ours, tokenizer)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()

"""Questions per second of the evaluation runner, batched against one-by-one, on the tiny LLaVA (CPU).

    python scripts/bench_eval.py --num-questions 32 --batch-size 8 --max-new-tokens 32

Builds a tiny LLaVA-1.5 checkpoint (or uses ``--model-path``), converts it to TWIST, writes questions about
synthetic images of several sizes, and answers them with ``llava_twist.eval.model_grounding.answer_questions``
at batch size 1 and at ``--batch-size`` (greedy, after a warm-up; best of ``--repeats`` alternating runs). It
also checks that both give the same answers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch
from PIL import Image, ImageDraw

from llava_twist.eval.model_grounding import answer_questions
from llava_twist.serve.generation import GenerationSettings
from llava_twist.serve.loading import LoadedModel, load_model

QUERIES = (
    "Where is the red circle left of the blue square? Answer step by step.",
    "Find all the circles. Answer step by step.",
    "What is in the image?",
    "How many triangles are there? Answer step by step.",
    "Please provide the bounding box coordinate of the region this sentence describes: the largest star.",
)


def make_questions(folder: str, n: int) -> list[dict[str, Any]]:
    questions = []
    for i in range(n):
        w, h = 120 + 37 * (i % 5), 90 + 23 * (i % 3)
        image = Image.new("RGB", (w, h), (240, 240, 235))
        ImageDraw.Draw(image).ellipse([10 + i % 20, 10, 50 + i % 20, 50], fill=(220, 40, 40))
        name = f"q{i:04d}.png"
        image.save(os.path.join(folder, name))
        questions.append({"question_id": i, "image": name, "text": QUERIES[i % len(QUERIES)]})
    return questions


def timed(loaded: LoadedModel, questions: list[dict[str, Any]], folder: str, settings: GenerationSettings,
          batch_sizes: tuple[int, ...], repeats: int) -> dict[int, tuple[float, list[str]]]:
    """Best questions/s per batch size; runs alternate between batch sizes so that load from other
    processes on a shared machine hits both alike."""
    for bs in batch_sizes:
        answer_questions(loaded, questions[:bs], folder, settings, bs, progress=False)
    best = dict.fromkeys(batch_sizes, float("inf"))
    texts: dict[int, list[str]] = {}
    for _ in range(repeats):
        for bs in batch_sizes:
            start = time.perf_counter()
            records = answer_questions(loaded, questions, folder, settings, bs, progress=False)
            best[bs] = min(best[bs], time.perf_counter() - start)
            texts[bs] = [r["text"] for r in records]
    return {bs: (len(questions) / best[bs], texts[bs]) for bs in batch_sizes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="a checkpoint folder (default: build a tiny LLaVA)")
    p.add_argument("--num-questions", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path
        if model_path is None:
            from llava_twist.tiny import build_tiny_llava

            model_path = str(build_tiny_llava(os.path.join(tmp, "llava-v1.5-tiny")))
        loaded = load_model(model_path, device=args.device)
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        questions = make_questions(folder, args.num_questions)
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
        runs = timed(loaded, questions, folder, settings, (1, args.batch_size), args.repeats)
        (single, single_texts), (batched, batched_texts) = runs[1], runs[args.batch_size]
    same = sum(a == b for a, b in zip(single_texts, batched_texts, strict=True))
    print(f"model {model_path} on {args.device}, {torch.get_num_threads()} threads, "
          f"{args.num_questions} questions, max_new_tokens {args.max_new_tokens}, greedy")
    print(f"one-by-one:       {single:8.2f} questions/s")
    print(f"batch size {args.batch_size:<4d}:  {batched:8.2f} questions/s")
    print(f"speed-up:         {batched / single:8.2f}x")
    print(f"identical answers batched vs one-by-one: {same}/{len(questions)}")


if __name__ == "__main__":
    main()

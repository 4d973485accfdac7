"""Serve the playground on this machine: ``python -m playground [--model-path DIR [--model-base DIR]] [--port 7860]``,
or as a client of a LLaVA serving stack: ``python -m playground --controller-url http://localhost:10000``.

With no ``--model-path`` it loads the demo's trained TWIST model (``playground/data/demo/playground.json``) or
builds and loads a tiny random LLaVA-1.5 (``playground/data/tiny-llava``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from playground.app import MAX_BATCH, MAX_FILE_SIZE, build_demo, create_backend, create_remote_backend, launch
from playground.models import PlaygroundError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m playground", description=__doc__)
    p.add_argument("--model-path", default=None,
                   help="TWIST checkpoint, TWIST delta or LLaVA-1.5 folder (default: the demo's trained model in "
                        "playground/data/demo, else a tiny random model built into playground/data/tiny-llava)")
    p.add_argument("--model-base", default=None, help="the LLaVA-1.5 base of a grounding-only TWIST delta")
    p.add_argument("--controller-url", default=None,
                   help="a LLaVA controller (python -m llava.serve.controller): ask the models its workers serve "
                        "instead of loading one here")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--max-file-size", default=MAX_FILE_SIZE, help="upload size limit, e.g. 10mb")
    p.add_argument("--limit-model-concurrency", type=int, default=MAX_BATCH,
                   help="users whose answers are generated together (local model; LLaVA's worker flag)")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llava_twist.serve.result import InferenceError

    if args.controller_url and (args.model_path or args.model_base):
        print("error: --controller-url asks the controller's workers; it takes no --model-path/--model-base",
              file=sys.stderr)
        return 2
    try:
        if args.controller_url:
            backend = create_remote_backend(args.controller_url)
        else:
            backend = create_backend(args.model_path, args.model_base, args.device, args.limit_model_concurrency,
                                     load_8bit=args.load_8bit, load_4bit=args.load_4bit)
    except (PlaygroundError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(backend.description.replace("**", "").replace("  \n", "\n"))
    try:
        demo = build_demo(backend)
    except PlaygroundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    launch(demo, args.host, args.port, args.max_file_size, examples_dir=backend.examples_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

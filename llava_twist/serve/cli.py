"""Ask a TWIST (or plain LLaVA-1.5) model one question about one image; print the chain and its boxes.

    python -m llava_twist.serve.cli --model-path ./checkpoints/llava-v1.5-7b-twist \\
        --image-file view.jpg --query "Where is the red car? Answer step by step." --save-image boxes.png

Tokens are streamed as they come; then the route (and router probability), each step with its boxes in
pixels of the original image, and the answer. ``--json`` prints one JSON object instead. An answer
without a box is reported as a miss with the parser's reason (exit status 0); a missing image, an
unloadable model or a bad option is an error message (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from llava_twist.model.routes import ROUTE_METAVAR, Route, route_flag
from llava_twist.serve.drawing import draw_boxes
from llava_twist.serve.generation import GenerationSettings, add_generation_arguments, generate, stream_generate
from llava_twist.serve.loading import MODEL_CLASSES, load_model
from llava_twist.serve.prompting import DEFAULT_CONV_MODE, load_image
from llava_twist.serve.result import InferenceError, InferenceResult
from scout_data.boxes import FRAMES
from scout_data.chain import answer_line, step_line
from scout_data.limits import OneLineParser
from scout_data.output import OutputError, atomic_write, check_output, image_format


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m llava_twist.serve.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None, help="the LLaVA-1.5 base of a grounding-only TWIST delta")
    p.add_argument("--model-class", choices=MODEL_CLASSES, default="twist",
                   help="llava: run the plain LLaVA-1.5 model of the checkpoint (no routes)")
    p.add_argument("--image-file", required=True)
    p.add_argument("--query", required=True, help="the question (without <image>)")
    p.add_argument("--conv-mode", default=DEFAULT_CONV_MODE)
    add_generation_arguments(p)
    p.add_argument("--route", type=route_flag, default=Route.AUTO, metavar=ROUTE_METAVAR)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--box-frame", choices=FRAMES, default=None,
                   help="frame of the model's box text (default: padded for image_aspect_ratio=pad)")
    p.add_argument("--json", action="store_true", help="print one JSON object (no streaming)")
    p.add_argument("--save-image", default=None, metavar="OUT.png", help="write the image with the boxes drawn")
    p.add_argument("--overwrite", action="store_true", help="replace --save-image if it exists")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    return p


def _fmt_box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


def format_result(result: InferenceResult) -> str:
    """The human-readable report: route, steps with pixel boxes, answer, miss reason and parser notes."""
    lines = []
    if result.route is not None:
        how = "forced" if result.route_forced else f"router p(grounding)={result.router_prob:.3f}"
        lines.append(f"route: {result.route} ({how})")
    w, h = result.image_size
    lines.append(f"boxes in pixels of the {w}x{h} image (model frame: {result.box_frame})")
    for step in result.chain.steps:
        lines.append(step_line(step.index, step.text))
        lines += [f"    box {_fmt_box(b.box_xyxy_px)}" for b in result.boxes if b.step == step.index]
    if result.chain.answer_text or result.answer_boxes_xyxy_px:
        lines.append(answer_line(result.chain.answer_text))
        lines += [f"    box {_fmt_box(b)}" for b in result.answer_boxes_xyxy_px]
    if result.miss_reason:
        lines.append(f"miss: {result.miss_reason}")
    for problem in result.chain.problems:
        if problem != result.miss_reason:
            lines.append(f"note: {problem}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = GenerationSettings.from_args(args)
    image = load_image(args.image_file)
    if args.save_image:
        try:
            image_format(args.save_image, "--save-image")
            check_output(args.save_image, [args.image_file], args.overwrite, "--save-image",
                         inside=[args.model_path, args.model_base])
        except OutputError as exc:
            raise InferenceError(str(exc)) from None
        folder = os.path.dirname(os.path.abspath(args.save_image))
        existing = folder
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK):
            raise InferenceError(f"--save-image {args.save_image}: cannot write into {folder}")
    loaded = load_model(args.model_path, args.model_base, args.device, args.model_class,
                        load_8bit=args.load_8bit, load_4bit=args.load_4bit)
    if args.json or args.num_beams > 1:
        result = generate(loaded, [args.query], [image], settings)[0]
        if not args.json:
            print(f"ASSISTANT: {result.text}")
    else:
        print("ASSISTANT: ", end="", flush=True)
        result = None
        for item in stream_generate(loaded, args.query, image, settings):
            if isinstance(item, str):
                print(item, end="", flush=True)
            else:
                result = item
        print()
    if args.save_image:
        drawn = draw_boxes(image, result)
        try:
            atomic_write(args.save_image, lambda tmp: drawn.save(tmp, format=image_format(args.save_image)))
        except OSError as exc:
            raise InferenceError(f"--save-image {args.save_image}: {exc.strerror or exc}") from None
    if args.json:
        payload = result.to_json()
        payload.update(model=args.model_path, image_file=args.image_file, query=args.query,
                       saved_image=args.save_image)
        print(json.dumps(payload, indent=2))
    else:
        print(format_result(result))
        if args.save_image:
            print(f"wrote {args.save_image}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

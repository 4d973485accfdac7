"""Answer a question file with a TWIST (or plain LLaVA-1.5) model, in batches: LLaVA's ``model_vqa`` for TWIST.

Question lines: ``{"question_id", "image", "text", ...}`` (``text`` without ``<image>``; other keys are
ground truth for the scorers). Answer lines, LLaVA's format: ``{"question_id", "prompt", "text",
"answer_id", "model_id", "metadata": {"route", "router_prob", "route_forced", "answer_box_scores"}}``.

``--num-chunks/--chunk-idx`` shard the questions as LLaVA's eval scripts do (one process per GPU). An
existing answers file is resumed only when every line was written by this command with the same model,
route, template, prompt, generation settings and prompt-building code (``metadata.settings``): its questions
are skipped (a torn last line is dropped). Otherwise the file is refused untouched, with what differs;
``--overwrite`` replaces it. Lines are flushed after every batch. ``--prompt`` chooses how a refexp question
is asked (:mod:`llava_twist.eval.prompts`).

    python -m llava_twist.eval.model_grounding --model-path ./checkpoints/llava-v1.5-7b-twist \\
        --question-file refcoco_val.jsonl --image-folder ./playground/data/eval/refcoco/images \\
        --answers-file answers/refcoco_val.jsonl --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import shortuuid
from tqdm import tqdm

from llava_twist.eval.common import EvalError, atomic_write_text, read_questions
from llava_twist.eval.prompts import PROMPT_STYLES, prompt_code_version, question_prompt
from llava_twist.model.builder import weights_fingerprint
from llava_twist.model.routes import ROUTE_METAVAR, Route, route_flag
from llava_twist.serve.generation import GenerationSettings, add_generation_arguments, generate
from llava_twist.serve.loading import MODEL_CLASSES, LoadedModel, load_model
from llava_twist.serve.prompting import DEFAULT_CONV_MODE, load_image
from llava_twist.serve.result import InferenceError, InferenceResult
from scout_data.inputs import InputError, read_input
from scout_data.limits import Bounded, OneLineParser
from scout_data.output import OutputError, describe_differences, output_lock
from scout_data.validate import image_path_problem


def split_list(items: list[Any], n: int) -> list[list[Any]]:
    """``n`` contiguous chunks of (nearly) equal size, as LLaVA's ``split_list``."""
    size = math.ceil(len(items) / n) if items else 1
    return [items[i : i + size] for i in range(0, len(items), size)]


def get_chunk(items: list[Any], n: int, k: int) -> list[Any]:
    if n < 1 or not 0 <= k < n:
        raise EvalError(f"--chunk-idx {k} is not in [0, --num-chunks {n})")
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else []


def answer_record(
    question: dict[str, Any], result: InferenceResult, model_id: str, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    metadata = {
        "route": result.route,
        "router_prob": result.router_prob,
        "route_forced": result.route_forced,
        "answer_box_scores": result.answer_box_scores,
    }
    if settings is not None:
        metadata["settings"] = settings
    return {
        "question_id": question["question_id"],
        "prompt": result.prompt or question["text"],
        "text": result.text,
        "answer_id": shortuuid.uuid(),
        "model_id": model_id,
        "metadata": metadata,
    }


def answer_settings(args: argparse.Namespace, loaded: LoadedModel) -> dict[str, Any]:
    """Everything that changes an answer besides the question: an answers file resumes only when it matches.
    The model is known by its weights (a strided sample of every tensor), not by its folder's name."""
    return {
        "model_id": loaded.model_name,
        "weights": weights_fingerprint(loaded.model)[:16],
        "dtype": str(loaded.dtype),
        "model_class": args.model_class,
        "route": args.route,
        "conv_mode": args.conv_mode,
        "prompt": args.prompt,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "prompt_code": prompt_code_version(),
    }


def resume_answers(path: str, settings: dict[str, Any], prompts: dict[str, str], overwrite: bool) -> set[str]:
    """Question ids already answered in ``path`` with the same ``settings`` and prompts.

    A file this command did not write, or wrote with other settings, is refused untouched (``--overwrite``
    replaces it); a torn last line (an interrupted run, possibly cut inside a character) is dropped."""
    if overwrite or not os.path.exists(path):
        atomic_write_text(path, "")
        return set()
    try:
        raw = read_input(path, what="--answers-file").split(b"\n")
    except InputError as exc:
        raise EvalError(str(exc)) from None  # JSON lines end in "\n" only; answers may hold U+2028 and friends
    not_ours = (f"--answers-file {path}: line {{}} is not an answer this command wrote; the file is left as it is "
                "(pass --overwrite to replace it, or choose another --answers-file)")
    kept, done = [], set()
    for n, chunk in enumerate(raw, 1):
        torn = n == len(raw)  # the text after the last newline: empty, or an interrupted line
        if not chunk.strip():
            continue
        try:
            row = json.loads(chunk.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if torn:
                continue
            raise EvalError(not_ours.format(n)) from None
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("metadata"), dict):
            raise EvalError(not_ours.format(n))
        differs = describe_differences(row["metadata"].get("settings"), settings)
        if differs:
            raise EvalError(
                f"--answers-file {path} holds answers made otherwise ({differs}); its answers would be stale: "
                "pass --overwrite or another --answers-file"
            )
        qid = str(row["question_id"])
        if qid in prompts and row.get("prompt") != prompts[qid]:
            raise EvalError(
                f"--answers-file {path}: question {qid} was asked {row.get('prompt')!r}, now {prompts[qid]!r}; "
                "pass --overwrite or another --answers-file"
            )
        kept.append(chunk.decode("utf-8") + "\n")
        done.add(qid)
    if raw[-1].strip():  # a torn last line: rewrite the file without it
        atomic_write_text(path, "".join(kept))
    return done


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def check_questions(questions: list[dict[str, Any]], image_folder: str, path: str) -> None:
    """Every question has an id, text and an existing image: fail before loading the model, not midway."""
    missing = []
    for n, q in enumerate(questions, 1):
        for key in ("question_id", "text", "image"):
            if key not in q:
                raise EvalError(f"{path}: question {n} has no {key!r}")
        if escape := image_path_problem(str(q["image"])):
            raise EvalError(f"{path}: question {n} ({q['question_id']!r}): {escape}")
        if not os.path.isfile(os.path.join(image_folder, q["image"])):
            missing.append(os.path.join(image_folder, q["image"]))
    if missing:
        raise EvalError(f"{len(missing)} image(s) not found, e.g. {missing[:3]} (check --image-folder)")


def answer_questions(
    loaded: LoadedModel,
    questions: list[dict[str, Any]],
    image_folder: str,
    settings: GenerationSettings,
    batch_size: int = 1,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    progress: bool = True,
    prompt: str = "scout",
    record_settings: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Answer ``questions`` in batches (images of the next batch load while the model runs this one), each asked
    with its ``prompt`` style (:mod:`llava_twist.eval.prompts`)."""

    def load(batch: list[dict[str, Any]]) -> list[Any]:
        # as LLaVA's training and model_vqa read them: EXIF orientation not applied
        return [load_image(os.path.join(image_folder, q["image"]), orient=False) for q in batch]

    batches = list(_batches(questions, max(1, batch_size)))
    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(questions), unit="q", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            images = pending.result()
            pending = pool.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
            results = generate(loaded, [question_prompt(q, prompt) for q in batch], images, settings)
            records = [
                answer_record(q, r, loaded.model_name, record_settings) for q, r in zip(batch, results, strict=True)
            ]
            out.extend(records)
            if on_batch is not None:
                on_batch(records)
            bar.update(len(batch))
    bar.close()
    return out


def eval_model(args: argparse.Namespace) -> dict[str, Any]:
    questions = read_questions(os.path.expanduser(args.question_file))
    questions = get_chunk(questions, args.num_chunks, args.chunk_idx)
    image_folder = os.path.expanduser(args.image_folder)
    check_questions(questions, image_folder, args.question_file)
    prompts = {str(q["question_id"]): question_prompt(q, args.prompt) for q in questions}
    loaded = load_model(os.path.expanduser(args.model_path), args.model_base, args.device, args.model_class)
    if args.model_id:
        loaded.model_name = args.model_id
    answers_file = os.path.expanduser(args.answers_file)
    record_settings = answer_settings(args, loaded)
    done = resume_answers(answers_file, record_settings, prompts, args.overwrite)
    todo = [q for q in questions if str(q["question_id"]) not in done]
    if done:
        print(f"resuming {answers_file}: {len(questions) - len(todo)} of {len(questions)} already answered")
    settings = GenerationSettings.from_args(args)
    with open(answers_file, "a", encoding="utf-8") as f:

        def write(records: list[dict[str, Any]]) -> None:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()

        start = time.perf_counter()
        answer_questions(loaded, todo, image_folder, settings, args.batch_size, write, prompt=args.prompt,
                         record_settings=record_settings)
        seconds = time.perf_counter() - start
    return {"answered": len(todo), "skipped": len(questions) - len(todo), "seconds": seconds}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m llava_twist.eval.model_grounding", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None)
    p.add_argument("--model-class", choices=MODEL_CLASSES, default="twist",
                   help="llava: answer with the plain LLaVA-1.5 model (the base of retention comparisons)")
    p.add_argument("--model-id", default=None, help="model_id written in the answers (default: from the path)")
    p.add_argument("--image-folder", default="")
    p.add_argument("--question-file", required=True)
    p.add_argument("--answers-file", required=True)
    p.add_argument("--conv-mode", default=DEFAULT_CONV_MODE)
    p.add_argument("--num-chunks", type=CHUNKS, default=1, help=f"{CHUNKS}: split the questions over this many runs")
    p.add_argument("--chunk-idx", type=CHUNK_INDEX, default=0, help=f"{CHUNK_INDEX}, below --num-chunks")
    add_generation_arguments(p)
    p.add_argument("--batch-size", type=BATCH_SIZE, default=1, help=f"{BATCH_SIZE}")
    p.add_argument("--route", type=route_flag, default=Route.AUTO, metavar=ROUTE_METAVAR)
    p.add_argument("--prompt", choices=PROMPT_STYLES, default="scout",
                   help="how a refexp question is asked: its own text (scout), LLaVA-1.5's REC prompt (llava) or "
                        "lmms-eval's (lmms-eval); the last two use the question's 'expression'")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the answers file; without it an existing file is resumed only when it holds this "
                        "command's answers made with the same model and settings")
    return p


CHUNKS = Bounded(int, 1, 100_000)
CHUNK_INDEX = Bounded(int, 0, 99_999)
BATCH_SIZE = Bounded(int, 1, 1024)


def check_arguments(args: argparse.Namespace) -> None:
    """What the command line asks that cannot be right, as an :class:`EvalError`, before any model loads."""
    from scout_data.output import check_output

    try:
        GenerationSettings(temperature=args.temperature, top_p=args.top_p)
    except InferenceError as exc:
        raise EvalError(str(exc)) from None
    try:  # resuming and --overwrite are the answers file's own rules; here only what it must never be
        check_output(os.path.expanduser(args.answers_file), [os.path.expanduser(args.question_file)],
                     overwrite=True, flag="--answers-file", inside=[
                         os.path.expanduser(p) for p in (args.model_path, args.model_base) if p])
    except OutputError as exc:
        raise EvalError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        with output_lock(os.path.expanduser(args.answers_file), "--answers-file"):  # one writer per answers file
            stats = eval_model(args)
    except (EvalError, InferenceError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rate = stats["answered"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    print(f"answered {stats['answered']} questions in {stats['seconds']:.1f} s ({rate:.2f} q/s) -> {args.answers_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

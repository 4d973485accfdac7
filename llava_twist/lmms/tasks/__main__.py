"""Write lmms-eval task YAMLs for a LLaVA question file (the shipped ``twist_rec`` / ``twist_understanding`` read the
demo's by default):

    python -m llava_twist.lmms.tasks --kind rec --question-file q.jsonl --image-folder images --out tasks/
    python -m lmms_eval --model llava_twist --model_args pretrained=... --include_path tasks/ --tasks twist_rec_q

The YAML includes the shipped task (prompt, parse, metrics stay in one place) and names the files, absolute.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from llava_twist.eval.common import EvalError, read_questions
from scout_data.output import OutputError, atomic_write_text, check_output

TASKS_DIR = Path(__file__).resolve().parent
KINDS = {"rec": ("twist_rec", ("expression", "bbox_xyxy_px", "width", "height")),
         "understanding": ("twist_understanding", ("text", "answer"))}
HEADER = "# Written by python -m llava_twist.lmms.tasks\n"


def task_yaml(kind: str, task: str, question_file: str | os.PathLike, image_folder: str | os.PathLike) -> str:
    """The YAML of task ``task``: the shipped ``kind`` task on ``question_file``, images under ``image_folder``."""
    base, _ = KINDS[kind]
    return (f"{HEADER}include: {TASKS_DIR / (base + '.yaml')}\ntask: {task}\ndataset_kwargs:\n  data_files:\n"
            f"    test: {Path(question_file).resolve()}\nlmms_eval_specific_kwargs:\n  default:\n"
            f"    image_folder: {Path(image_folder).resolve()}\n")


def check_questions(kind: str, question_file: str) -> int:
    """The number of questions; :class:`EvalError` naming the first record that lacks what ``kind`` reads."""
    questions = read_questions(question_file)
    if not questions:
        raise EvalError(f"{question_file}: no questions")
    _, needed = KINDS[kind]
    for n, q in enumerate(questions, 1):
        missing = [key for key in ("image", *needed) if q.get(key) in (None, "")]
        if missing:
            raise EvalError(f"{question_file}: question {q['question_id']!r} (record {n}) has no {', '.join(missing)}"
                            f" (a {kind} task reads them)")
    return len(questions)


def _written_here(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(len(HEADER)) == HEADER
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_twist.lmms.tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=sorted(KINDS), required=True)
    p.add_argument("--question-file", required=True)
    p.add_argument("--image-folder", required=True, help="the questions' `image` paths are relative to it")
    p.add_argument("--out", required=True, help="folder for the YAML (pass it to lmms-eval's --include_path)")
    p.add_argument("--task", default=None, help="task name (default: twist_<kind>_<question file stem>)")
    p.add_argument("--overwrite", action="store_true", help="replace a YAML this command did not write")
    args = p.parse_args(argv)
    stem = re.sub(r"\W+", "_", Path(args.question_file).name.removesuffix(".jsonl"))
    task = args.task or f"twist_{args.kind}_{stem}"
    path = Path(args.out) / f"{task}.yaml"
    try:
        if not os.path.isdir(args.image_folder):
            raise EvalError(f"--image-folder {args.image_folder}: not a folder")
        n = check_questions(args.kind, args.question_file)
        check_output(str(path), [args.question_file], args.overwrite, "--out",
                     made_here=_written_here)
    except (EvalError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(path), task_yaml(args.kind, task, args.question_file, args.image_folder))
    print(f"wrote {path}: task {task}, {n} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())

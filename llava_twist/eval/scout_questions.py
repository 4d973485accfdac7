"""Question files from SCOUT JSON (``scout-data`` output, e.g. ``DIR/test.json``): one JSONL per benchmark.

    python -m llava_twist.eval.scout_questions --scout-json data/scout/test.json --out-dir playground/data/eval/scout

writes, for the records of each kind present:

- ``refexp.jsonl`` (refexp, region): ``bbox_xyxy_px`` of the target and the ``expression`` alone (for
  ``model_grounding --prompt llava | lmms-eval``) -> ``eval_refexp``;
- ``grounded_caption.jsonl``: ``phrases: [{phrase, boxes_xyxy_px}]`` -> ``eval_grounded_caption``;
- ``localization.jsonl`` (find_all, count): ``gt_boxes_xyxy_px``, ``category`` -> ``eval_localization``;
- ``vqa.jsonl`` (qa): ``answer`` -> ``eval_retention`` (accuracy delta against the base).

Every line: ``question_id`` (the record id), ``image`` (relative to the record's image folder), ``text``
(the training-time human prompt without ``<image>``), ``kind``, ``width``, ``height``, ``box_frame`` (the
frame the model was trained to answer in), ``subset`` (``<source>_<split>``). Ground-truth boxes are
pixels of the original image.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from llava_twist.eval.common import EvalError, atomic_write_text
from scout_data.inputs import InputError, read_input
from scout_data.limits import Bounded, OneLineParser
from scout_data.schema import BOX_SLOT
from scout_data.writer import IMAGE_TOKEN, render_prompt

BENCHMARKS = {
    "refexp": "refexp",
    "region": "refexp",
    "grounded_caption": "grounded_caption",
    "find_all": "localization",
    "count": "localization",
    "qa": "vqa",
}
_BOX_SLOT_RE = re.compile(re.escape(BOX_SLOT))


LIMIT = Bounded(int, 1, 10_000_000)


def prompt_text(record: dict[str, Any]) -> str:
    """The human turn without ``<image>`` (what the model was trained on), else the rendered prompt."""
    for turn in record.get("conversations") or []:
        if turn.get("from") == "human":
            return turn["value"].replace(IMAGE_TOKEN, "").strip()
    return render_prompt(record["query"], record["kind"])


def caption_phrases(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Ground-truth phrases of a grounded caption with their pixel boxes.

    Flickr30k records list their phrases (``source_ids.phrases`` with ``num_boxes``, in answer-box order);
    otherwise each answer box is one phrase, named by the caption text before its ``<box>`` slot."""
    boxes = [list(b) for b in record.get("answer_boxes_xyxy_px", [])]
    listed = (record.get("source_ids") or {}).get("phrases")
    if isinstance(listed, list) and sum(int(p.get("num_boxes", 0)) for p in listed) == len(boxes):
        out, pos = [], 0
        for p in listed:
            n = int(p["num_boxes"])
            out.append({"phrase": p.get("phrase", ""), "boxes_xyxy_px": boxes[pos : pos + n]})
            pos += n
        return out
    pieces = _BOX_SLOT_RE.split(record.get("answer_text", ""))[: len(boxes)]
    if len(pieces) != len(boxes):
        pieces = [""] * len(boxes)
    names = [re.split(r",| and |: ", piece)[-1].strip(" .,") for piece in pieces]
    return [{"phrase": name, "boxes_xyxy_px": [box]} for name, box in zip(names, boxes, strict=True)]


def question_for(record: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(benchmark, question line) for one SCOUT record, or None for kinds no benchmark scores."""
    kind = record.get("kind")
    bench = BENCHMARKS.get(kind)
    if bench is None:
        return None
    width, height = record["image_size"]
    q: dict[str, Any] = {
        "question_id": record["id"],
        "image": record["image"],
        "text": prompt_text(record),
        "kind": kind,
        "width": width,
        "height": height,
        "box_frame": record.get("box_frame", "padded"),
        "subset": f"{record.get('source', 'scout')}_{record.get('split', 'test')}",
    }
    boxes = [list(b) for b in record.get("answer_boxes_xyxy_px", [])]
    if bench == "refexp":
        if not boxes:
            return None
        q["bbox_xyxy_px"] = boxes[0]
        if record.get("expression"):
            q["expression"] = record["expression"]  # for --prompt llava / lmms-eval (model_grounding)
        expression_type = (record.get("source_ids") or {}).get("expression_type")
        if expression_type:
            q["expression_type"] = expression_type
    elif bench == "grounded_caption":
        q["phrases"] = caption_phrases(record)
    elif bench == "localization":
        ids = record.get("source_ids") or {}
        q["gt_boxes_xyxy_px"] = boxes
        q["category"] = str(ids.get("category_id", ids.get("name", "object")))
        if kind == "count":
            q["answer"] = str(len(boxes))
    else:
        q["answer"] = record.get("answer_text", "")
        q["benchmark"] = f"{record.get('source', 'scout')}_qa"
        question_type = (record.get("source_ids") or {}).get("question_type")
        if question_type:
            q["question_type"] = question_type
    return bench, q


WRITTEN = ".scout-questions.json"  # the question files this command wrote into a folder (a rerun may replace them)


def written_here(out_dir: str) -> set[str]:
    try:
        with open(os.path.join(out_dir, WRITTEN), encoding="utf-8") as f:
            return set(json.load(f).get("files", []))
    except (OSError, ValueError, AttributeError):
        return set()


def convert(scout_json: str, out_dir: str, limit: int | None = None, overwrite: bool = False) -> dict[str, int]:
    """Write ``out_dir/<benchmark>.jsonl`` from a SCOUT JSON list; returns lines per benchmark. A question file
    already there that this command did not write is refused unless ``overwrite``."""
    try:
        records = json.loads(read_input(scout_json, what="--scout-json"))
    except FileNotFoundError:
        raise EvalError(f"--scout-json {scout_json}: not found") from None
    except InputError as exc:
        raise EvalError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise EvalError(f"{scout_json}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(records, list):
        raise EvalError(f"{scout_json}: expected a JSON list of SCOUT records")
    lines: dict[str, list[str]] = {}
    counts: Counter[str] = Counter()
    for n, record in enumerate(records):
        try:
            got = question_for(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise EvalError(f"{scout_json}: record {n} ({record.get('id')!r}) is not a SCOUT record: {exc!r}") from None
        if got is None or (limit is not None and counts[got[0]] >= limit):
            continue
        counts[got[0]] += 1
        lines.setdefault(got[0], []).append(json.dumps(got[1], ensure_ascii=False) + "\n")
    from scout_data.output import OutputError, check_output, output_lock

    try:
        with output_lock(out_dir, "--out-dir"):  # one writer per folder: its files come from one input
            ours = written_here(out_dir)
            for bench in lines:
                check_output(os.path.join(out_dir, f"{bench}.jsonl"), [scout_json], overwrite, "--out-dir",
                             made_here=lambda path: os.path.basename(path) in ours)
            for bench, rows in lines.items():
                atomic_write_text(os.path.join(out_dir, f"{bench}.jsonl"), "".join(rows))
            if lines:
                atomic_write_text(os.path.join(out_dir, WRITTEN),
                                  json.dumps({"files": sorted(ours | {f"{b}.jsonl" for b in lines})}) + "\n")
    except OutputError as exc:
        raise EvalError(str(exc)) from None
    return dict(counts)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m llava_twist.eval.scout_questions", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scout-json", required=True, help="a SCOUT split file, e.g. DIR/test.json")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--limit", type=LIMIT, default=None, help=f"at most this many questions per benchmark ({LIMIT})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace question files in --out-dir that this command did not write")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        counts = convert(args.scout_json, args.out_dir, args.limit, args.overwrite)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for bench, n in sorted(counts.items()):
        print(f"{os.path.join(args.out_dir, bench + '.jsonl')}: {n} questions")
    if not counts:
        print("no record of a scored kind (refexp, region, grounded_caption, find_all, count, qa)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

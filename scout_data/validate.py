"""Check LLaVA conversation JSON: the file as a whole (:func:`validate_file`) and one record
(:func:`record_problems`, which converters and the synthetic generator apply before writing).

Box checks apply to every gpt turn of records tagged ``task: grounding`` and of untagged records
(every ``[x1, y1, x2, y2]`` must lie in [0, 1] and have area); records tagged ``task: understanding``
(replayed instruction data, whose text may hold code or lists) get the structural checks only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from scout_data.boxes import FRAMES, box_field_problem
from scout_data.images import image_size_problem
from scout_data.inputs import MAX_IMAGE_BYTES, InputError, check_input, read_input
from scout_data.parse import parse_chain
from scout_data.schema import TASKS

IMAGE_TOKEN = "<image>"
_BOX_TOLERANCE = 0.0051  # two-decimal box text vs the full-precision boxes stored alongside


class DataError(Exception):
    """Input that cannot be used at all (unreadable or malformed file); the message names the file."""


@dataclass
class BadRecord:
    file: str
    index: int
    id: object
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.index} id={self.id} {self.reason}"


def load_json(path: str) -> Any:
    """``json.load`` with errors that name the file, line and column."""
    try:
        return json.loads(read_input(path).decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except InputError as exc:
        raise DataError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def load_records(path: str) -> list[Any]:
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: top level must be a JSON list of records, got {type(data).__name__}")
    return data


def load_conversations(path: str, strict: bool = True) -> list[dict[str, Any]]:
    """The file's records, each a LLaVA conversation record in shape (what mix, stats and preview read); the first
    that is not is a :class:`DataError` naming the file, its index and id (``validate`` reports every problem).
    ``strict=False`` (another dataset replayed as it is, e.g. LLaVA's mix665k, whose loader tolerates a leading gpt
    turn): only an object with a ``conversations`` list."""
    records = load_records(path)
    for index, record in enumerate(records):
        if strict:
            problems = _structure_problems(record)
        elif not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            problems = ["not an object with a 'conversations' list"]
        else:
            problems = []
        if problems:
            record_id = record.get("id") if isinstance(record, dict) else None
            raise DataError(f"{path}: record {index} (id {record_id!r}): {problems[0]}")
    return records


def image_path_problem(image: str) -> str | None:
    """The rule for an image path in a record or question: relative, and inside its image folder."""
    if os.path.isabs(image) or ".." in Path(image).parts:
        return f"image {image!r} leaves the image folder (an absolute path or '..')"
    return None


class ImageChecker:
    """Opens each image once (cached): existence, readability, size."""

    def __init__(self, image_folder: str, verify: bool = True) -> None:
        self.image_folder = image_folder
        self.verify = verify
        self._cache: dict[str, tuple[str | None, tuple[int, int] | None]] = {}

    def check(self, rel: str) -> tuple[str | None, tuple[int, int] | None]:
        if rel not in self._cache:
            self._cache[rel] = self._open(rel)
        return self._cache[rel]

    def _open(self, rel: str) -> tuple[str | None, tuple[int, int] | None]:
        path = os.path.join(self.image_folder, rel)
        try:
            check_input(path, MAX_IMAGE_BYTES, "image")
        except FileNotFoundError:
            return f"image not found: {path}", None
        except InputError as exc:
            return str(exc), None
        try:
            with Image.open(path) as im:
                size = im.size
                if self.verify:
                    im.load()  # decoded whole, as the model's reader does (verify() skips a JPEG's scan data)
        except Exception as exc:
            return f"image does not open: {path} ({type(exc).__name__}: {exc})", None
        if problem := image_size_problem(*size):
            return f"image {path}: {problem}", None
        return None, size


def _structure_problems(record: Any) -> list[str]:
    if not isinstance(record, dict):
        return [f"record is a {type(record).__name__}, not an object"]
    problems = []
    if "id" not in record:
        problems.append("missing 'id'")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        return problems + ["'conversations' must be a non-empty list"]
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            return problems + [f"turn {j} must be an object with 'from' and a string 'value'"]
        expected = "human" if j % 2 == 0 else "gpt"
        if turn["from"] != expected:
            problems.append(
                f"turn {j} is from {turn['from']!r}, expected {expected!r} (roles alternate, human first)"
            )
    if len(convs) < 2:
        problems.append("no gpt turn")
    n_tokens = [t["value"].count(IMAGE_TOKEN) for t in convs]
    if "image" in record:
        if not isinstance(record["image"], str) or not record["image"]:
            problems.append("'image' must be a non-empty string path")
        elif escape := image_path_problem(record["image"]):
            problems.append(escape)
        if n_tokens[0] != 1:
            problems.append(f"first human turn has {n_tokens[0]} '<image>' tokens, expected exactly 1")
        if sum(n_tokens[1:]):
            problems.append("'<image>' appears after the first human turn")
    elif sum(n_tokens):
        problems.append("'<image>' in a record without 'image'")
    return problems + _field_problems(record)


def _field_problems(record: dict[str, Any]) -> list[str]:
    """The fields the writers add beside LLaVA's (``task``, ``box_frame``, ``image_size``), when present, hold what
    they say."""
    problems = []
    if "task" in record and record["task"] not in TASKS:
        problems.append(f"task {record['task']!r} is not one of {', '.join(TASKS)} (training refuses it)")
    if "box_frame" in record and record["box_frame"] not in FRAMES:
        problems.append(f"box_frame {record['box_frame']!r} is not one of {', '.join(FRAMES)}")
    size = record.get("image_size")
    if "image_size" in record and not (
        isinstance(size, list) and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        problems.append(f"image_size {size!r} must be [width, height], two positive integers")
    if box := box_field_problem(record):
        problems.append(box)
    return problems


def _close(a: Iterable[float], b: Iterable[float]) -> bool:
    return all(abs(x - y) <= _BOX_TOLERANCE for x, y in zip(a, b, strict=True))


_CHECKED_WHEN_UNTAGGED = ("box outside", "coordinates not normalised", "degenerate box", "steps out of order")


def _chain_problems(record: dict[str, Any]) -> list[str]:
    task = record.get("task")
    if task == "understanding":
        return []
    problems = []
    strict = task == "grounding"
    gpt_turns = [t["value"] for t in record["conversations"][1::2]]
    for j, value in enumerate(gpt_turns):
        chain = parse_chain(value)
        where = f"gpt turn {2 * j + 1}: " if len(gpt_turns) > 1 else ""
        for p in chain.problems:
            if p.startswith("no answer line"):
                if strict and chain.steps:
                    problems.append(where + p)
            elif strict or p.startswith(_CHECKED_WHEN_UNTAGGED):
                problems.append(where + p)
        if j == 0 and strict and isinstance(record.get("answer_boxes_xyxy_norm"), list):
            stored = record["answer_boxes_xyxy_norm"]
            got = chain.answer_boxes_xyxy_norm
            if len(stored) != len(got):
                problems.append(f"answer boxes in the text ({len(got)}) != stored ({len(stored)})")
            elif differ := [(a, b) for a, b in zip(got, stored, strict=True) if not _close(a, b)]:
                problems.append(f"answer box in the text {list(differ[0][0])} != stored {differ[0][1]}")
    return problems


def record_problems(
    record: Any, image_folder: str | None = None, images: ImageChecker | None = None
) -> list[str]:
    """Every reason ``record`` is unusable as LLaVA training data (empty when it is fine).

    With ``image_folder`` (or an :class:`ImageChecker`, which caches) the image must exist and open.
    """
    problems = _structure_problems(record)
    if problems:
        return problems
    problems = _chain_problems(record)
    if "image" in record and (images is not None or image_folder is not None):
        checker = images or ImageChecker(image_folder or "")
        err, size = checker.check(record["image"])
        if err:
            problems.append(err)
        elif isinstance(record.get("image_size"), list) and size and list(size) != record["image_size"]:
            problems.append(f"image_size {record['image_size']} differs from the image file's {list(size)}")
    return problems


def _id_problems(records: list[Any]) -> dict[int, str]:
    """Ids as the consumers key them (``str(id)``: LLaVA's loader, the question files, the scorers): each a
    string or an integer, and no two alike (``1`` and ``"1"`` are one id)."""
    problems, first = {}, {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "id" not in rec:
            continue
        rid = rec["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            problems[i] = f"id {rid!r} must be a string or an integer"
        elif str(rid) in first:
            j = first[str(rid)]
            problems[i] = f"id {rid!r} repeats record {j}'s id {records[j]['id']!r} (ids are compared as text)"
        else:
            first[str(rid)] = i
    return problems


def validate_records(records: list[Any], file: str, image_folder: str | None = None) -> list[BadRecord]:
    images = ImageChecker(image_folder) if image_folder is not None else None
    ids = _id_problems(records)
    bad = []
    for i, rec in enumerate(records):
        reasons = record_problems(rec, image_folder, images)
        for reason in reasons + ([ids[i]] if i in ids else []):
            rid = rec.get("id") if isinstance(rec, dict) else None
            bad.append(BadRecord(file, i, rid, reason))
    return bad


def validate_file(path: str, image_folder: str | None = None) -> tuple[int, list[BadRecord]]:
    """``(number of records, bad records)``; raises :class:`DataError` on an unreadable/malformed file."""
    records = load_records(path)
    return len(records), validate_records(records, path, image_folder)

"""Check a LLaVA conversation JSON file before training: fail early naming the bad record, or skip it.

A record needs ``conversations`` (a list of ``{from: human|gpt, value: str}`` turns that alternate,
starting with human, with at least one gpt turn) and, when it has ``image``, the file under
``--image_folder`` and one ``<image>`` placeholder in the first human turn; a record without ``image``
has no placeholder; an image path stays inside ``--image_folder`` (no absolute path, no ``..``). ``task``
(SCOUT) is ``grounding`` or ``understanding``; records without it are understanding samples (LLaVA's own
instruction data). A grounding record's answers hold only valid boxes: fractions in [0, 1], x1 < x2, y1 < y2.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN

from scout_data.inputs import InputError, read_input
from scout_data.parse import INVALID_BOX_PROBLEMS, parse_boxes
from scout_data.schema import GROUNDING_TASK, TASKS, UNDERSTANDING_TASK
from scout_data.validate import ImageChecker, image_path_problem

logger = logging.getLogger(__name__)

MAX_REASONS_LOGGED = 20


class BadRecordError(ValueError):
    """A training record that LLaVA's preprocessing would choke on (or silently mistrain on)."""


def record_problem(record: Any, image_folder: str | None, images: ImageChecker | None = None) -> str | None:
    """Why ``record`` cannot be trained on, or None. With ``images`` the image's header must also read (a 0-byte or
    non-image file would otherwise pass and stop the run at its first step); the pixels are decoded in training."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "no 'conversations' list (or it is empty)"
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"conversations[{t}] is not a {{'from': ..., 'value': str}} turn"
        if turn.get("from") not in ("human", "gpt"):
            return f"conversations[{t}]: 'from' is {turn.get('from')!r}, expected 'human' or 'gpt'"
    turns = conversations[1:] if conversations[0]["from"] != "human" else conversations
    for t, turn in enumerate(turns):
        if turn["from"] != ("human", "gpt")[t % 2]:
            return "turns must alternate human, gpt, human, ... (LLaVA's v1 template)"
    if len(turns) < 2:
        return "no gpt answer to train on"
    task = record.get("task", UNDERSTANDING_TASK)
    if task not in TASKS:
        return f"task {task!r}: expected one of {TASKS}"
    if task == GROUNDING_TASK:
        for turn in turns[1::2]:
            problems: list[str] = []
            parse_boxes(turn["value"], problems)
            invalid = [p for p in problems if p.startswith(INVALID_BOX_PROBLEMS)]
            if invalid:
                return f"invalid box in a gpt turn: {invalid[0]}"
    placeholders = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in conversations)
    image = record.get("image")
    if image is None:
        if placeholders:
            return f"{DEFAULT_IMAGE_TOKEN} placeholder in the text but no 'image'"
        return None
    if not isinstance(image, str) or not image:
        return f"'image' must be a file name, got {image!r}"
    if escape := image_path_problem(image):
        return escape
    if placeholders != 1 or DEFAULT_IMAGE_TOKEN not in turns[0]["value"]:
        return f"expected one {DEFAULT_IMAGE_TOKEN} placeholder in the first human turn, found {placeholders} in all"
    if not os.path.isfile(os.path.join(image_folder or "", image)):
        return f"image {image!r} not found under --image_folder {image_folder}"
    if images is not None and (problem := images.check(image)[0]):
        return problem
    return None


def load_records(path: str | os.PathLike) -> list[Any]:
    """The JSON list in ``path``; errors name the file (and the line of a syntax error)."""
    file = Path(path)
    try:
        data = json.loads(read_input(file, what="--data_path").decode("utf-8"))
    except InputError as e:
        raise BadRecordError(str(e)) from None
    except UnicodeDecodeError:
        raise BadRecordError(f"--data_path {file}: not a UTF-8 JSON file") from None
    except RecursionError:
        raise BadRecordError(f"--data_path {file}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise BadRecordError(f"--data_path {file}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise BadRecordError(f"--data_path {file}: expected a JSON list of records, got {type(data).__name__}")
    return data


def check_image_folder(records: list[Any], image_folder: str | None) -> None:
    """A missing (or unset) image folder is a setup error, whatever ``skip_bad`` says."""
    if not any(isinstance(r, dict) and "image" in r for r in records):
        return
    if not image_folder:
        raise FileNotFoundError("the data has images but --image_folder is not set")
    if not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image_folder {image_folder}: no such directory")


def validated_records(
    data_path: str | os.PathLike,
    image_folder: str | None,
    skip_bad: bool = False,
    log: Callable[[str], None] = logger.warning,
) -> list[dict[str, Any]]:
    """The file's records, checked. A bad record raises ``BadRecordError`` naming the file, its index and id;
    with ``skip_bad`` it is dropped and the reason logged."""
    records = load_records(data_path)
    check_image_folder(records, image_folder)
    images = ImageChecker(image_folder or "", verify=False)
    kept, skipped = [], 0
    for index, record in enumerate(records):
        problem = record_problem(record, image_folder, images)
        if problem is None:
            kept.append(record)
            continue
        record_id = record.get("id", "<no id>") if isinstance(record, dict) else "<no id>"
        message = f"{data_path}: record {index} (id {record_id!r}): {problem}"
        if not skip_bad:
            raise BadRecordError(message + " (pass --twist_skip_bad_records True to skip such records)")
        skipped += 1
        if skipped <= MAX_REASONS_LOGGED:
            log(f"skipping {message}")
    if skipped:
        log(f"{data_path}: skipped {skipped} of {len(records)} records")
    if not kept:
        raise BadRecordError(f"{data_path}: no usable record ({len(records)} in the file)")
    return kept

"""Helpers shared by the real-annotation converters (coco, refcoco, flickr30k, vg).

Box policy, the same for every source: a pixel ``xyxy`` box is checked with
``boxes.box_problem_px`` against the image size from the annotation; a box that pokes out of the
image by at most ``CLAMP_TOL_PX`` (annotation rounding) is clamped, anything worse is a problem the
caller turns into a ``Skip``. A box too thin to survive 2-decimal box text (x2 == x1 after rounding,
in either frame) is also a problem, since the rendered record would fail validation.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scout_data.boxes import (
    FRAMES,
    Box,
    box_problem_px,
    box_xyxy_px_to_norm,
    clamp_xyxy_px,
    coco_xywh_to_xyxy,
    format_box,
)
from scout_data.inputs import InputError, read_input
from scout_data.schema import Skip

CLAMP_TOL_PX = 1.0
BOX_DECIMALS = 2


class InputFileError(ValueError):
    """An input file (not a record in it) is malformed; the message names the file and the problem."""


def load_json(path: str | Path, what: str) -> Any:
    """Parse a JSON input file; a missing or malformed file raises an error naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} file not found: {p}")
    try:
        return json.loads(read_input(p, what=f"{what} file"))
    except InputError as e:
        raise InputFileError(str(e)) from None
    except RecursionError:
        raise InputFileError(f"{what} file {p}: JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(f"{what} file {p} is not valid JSON: {e}") from e


def require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {p}")
    return p


def load_coco(path: str | Path) -> tuple[Any, list[Skip]]:
    """A COCO instances JSON as a ``pycocotools`` COCO object, and a ``Skip`` per unusable annotation.

    A file that is not a COCO instances object (or whose images/categories lack ids) raises
    ``InputFileError``; an annotation without an id, image_id or category_id is left out of the index
    and reported.
    """
    from pycocotools.coco import COCO

    data = load_json(path, "COCO instances")
    if not isinstance(data, dict):
        raise InputFileError(f"COCO instances file {path} must hold a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputFileError(f"COCO instances file {path} lacks a {key!r} list")
    for key in ("images", "categories"):
        for i, rec in enumerate(data[key]):
            if not isinstance(rec, dict) or not is_id(rec.get("id")):
                raise InputFileError(f"COCO instances file {path}: {key}[{i}] is not an object with an 'id'")
        first = {}
        for i, rec in enumerate(data[key]):
            if first.setdefault(rec["id"], i) != i:
                raise InputFileError(f"COCO instances file {path}: {key}[{i}] repeats the id {rec['id']!r} of "
                                     f"{key}[{first[rec['id']]}] (one would silently replace the other)")
    fname = Path(path).name
    skips: list[Skip] = []
    anns = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not is_id(ann.get("id")):
            skips.append(Skip(f"{fname}:annotations[{i}]", "annotation is not an object with an 'id'"))
        elif not (is_id(ann.get("image_id")) and is_id(ann.get("category_id"))):
            skips.append(Skip(f"{fname}:ann {ann['id']}", "annotation lacks an image_id or category_id"))
        else:
            anns.append(ann)
    coco = COCO()
    coco.dataset = {**data, "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, skips


def is_id(v: object) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def image_size_problem(width: object, height: object) -> str | None:
    if not (is_number(width) and is_number(height)) or width <= 0 or height <= 0:  # type: ignore[operator]
        return f"image size {width!r}x{height!r} is not two positive numbers"
    return None


def renders_degenerate(box: Sequence[float], width: int, height: int) -> bool:
    """True when 2-decimal box text of ``box`` has no area in some frame."""
    side = max(width, height)
    if box[2] - box[0] >= 0.02 * side and box[3] - box[1] >= 0.02 * side:
        return False  # rounding moves each edge by at most 0.005 of the frame
    for frame in FRAMES:
        text = format_box(box_xyxy_px_to_norm(box, width, height, frame), BOX_DECIMALS)
        x1, y1, x2, y2 = (float(v) for v in text[1:-1].split(","))
        if not (x2 > x1 and y2 > y1):
            return True
    return False


def check_box(box: Sequence[object], width: int, height: int) -> tuple[Box | None, str | None]:
    """``(usable_box, None)`` or ``(None, reason)`` for a pixel xyxy box in a ``width`` x ``height`` image."""
    if len(box) != 4 or not all(is_number(v) for v in box):
        return None, f"box {list(box)!r} is not 4 numbers"
    b: Box = tuple(float(v) for v in box)  # type: ignore[assignment]
    problem = box_problem_px(b, width, height)
    if problem is not None and b[2] > b[0] and b[3] > b[1]:
        out_by = max(-b[0], -b[1], b[2] - width, b[3] - height)
        if out_by <= CLAMP_TOL_PX:
            b = clamp_xyxy_px(b, width, height)
            problem = box_problem_px(b, width, height)
    if problem is not None:
        return None, problem
    if renders_degenerate(b, width, height):
        return None, f"box {[round(v, 1) for v in b]} is too small to show at {BOX_DECIMALS} decimals"
    return b, None


def coco_ann_box(ann: dict, width: int, height: int) -> tuple[Box | None, str | None]:
    """A COCO annotation's ``[x, y, w, h]`` as a checked pixel xyxy box, or ``(None, reason)``."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        return None, f"bbox {bbox!r} is not 4 numbers [x, y, w, h]"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return None, f"zero-area box {bbox} (COCO [x, y, w, h])"
    return check_box(coco_xywh_to_xyxy(bbox), width, height)


def image_problem(images_dir: str | Path | None, rel_path: str) -> str | None:
    """Why the image file cannot be used (only checked when an image folder is given)."""
    if images_dir is None:
        return None
    if not (Path(images_dir) / rel_path).is_file():
        return f"image file {rel_path} not found in {images_dir}"
    return None


def area(b: Sequence[float]) -> float:
    return (b[2] - b[0]) * (b[3] - b[1])


def center(b: Sequence[float]) -> tuple[float, float]:
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def rng_for(seed: int, key: str) -> random.Random:
    """A generator that depends only on ``seed`` and ``key`` (so output does not depend on order)."""
    return random.Random(f"{seed}:{key}")


_IRREGULAR = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "child": "children",
    "mouse": "mice",
    "knife": "knives",
    "leaf": "leaves",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "skis": "skis",
    "scissors": "scissors",
    "broccoli": "broccoli",
    "glasses": "glasses",
    "jeans": "jeans",
    "pants": "pants",
    "shorts": "shorts",
}


def looks_plural(name: str) -> bool:
    """True for names like ``trees`` (one box may hold a group); ``sheep`` and ``skis`` are not."""
    low = name.rpartition(" ")[2].lower()
    return low not in _IRREGULAR and low.endswith("s") and not low.endswith(("ss", "us", "is"))


def plural(name: str) -> str:
    """English plural of a category name (the last word is inflected)."""
    head, _, last = name.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR:
        out = _IRREGULAR[low]
    elif low.endswith("s") and not low.endswith(("ss", "us", "is")):
        out = last
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        out = last + "es"
    elif low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        out = last[:-1] + "ies"
    else:
        out = last + "s"
    return f"{head} {out}" if head else out


def count_phrase(n: int, name: str) -> str:
    return f"{n} {name if n == 1 else plural(name)}"


def with_article(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def quote(text: str) -> str:
    return '"' + " ".join(text.split()) + '"'

"""Hand-written SCOUT-style records (grounding, stepwise) and LLaVA-style understanding records, with tiny PNGs."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}
BOXES = [
    (0.10, 0.15, 0.30, 0.35),
    (0.55, 0.20, 0.80, 0.45),
    (0.40, 0.40, 0.60, 0.60),
    (0.20, 0.60, 0.45, 0.85),
]


def fmt(box: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def grounding_record(i: int) -> dict:
    color, other = list(COLORS)[i % 4], list(COLORS)[(i + 1) % 4]
    target, distractor, anchor = BOXES[i % 4], BOXES[(i + 1) % 4], BOXES[(i + 2) % 4]
    answer = (
        f"Step 1: The question asks for the {color} circle left of the {other} square.\n"
        f"Step 2: I see these candidates: {color} circle {fmt(target)}, {color} circle {fmt(distractor)}.\n"
        f"Step 3: The {other} square is at {fmt(anchor)}; the one left of it is {fmt(target)}.\n"
        f"Answer: {fmt(target)}"
    )
    return {
        "id": f"scout-{i}",
        "image": f"scene_{i}.png",
        "task": "grounding",
        "kind": "relation",
        "box_frame": "padded",
        "conversations": [
            {"from": "human", "value": f"<image>\nWhere is the {color} circle left of the {other} square? "
                                       "Answer step by step."},
            {"from": "gpt", "value": answer},
        ],
    }


def understanding_record(i: int) -> dict:
    color = list(COLORS)[i % 4]
    return {
        "id": f"llava-{i}",
        "image": f"scene_{i}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the small square?"},
            {"from": "gpt", "value": f"It is {color}."},
            {"from": "human", "value": "How many triangles are there?"},
            {"from": "gpt", "value": f"There are {i % 3 + 1} triangles."},
        ],
    }


def write_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (64 + 8 * (i % 3), 48), (250, 250, 250))
        x0, y0, x1, y1 = (int(v * 48) for v in BOXES[i % 4])
        img.paste(COLORS[list(COLORS)[i % 4]], (x0, y0, x1 + 1, y1 + 1))
        img.save(folder / f"scene_{i}.png")


def write_dataset(root: Path, n_grounding: int = 4, n_understanding: int = 4) -> tuple[Path, Path]:
    """(data json, image folder) with grounding and understanding records, interleaved."""
    images = root / "images"
    write_images(images, max(n_grounding, n_understanding))
    records = []
    for i in range(max(n_grounding, n_understanding)):
        if i < n_grounding:
            records.append(grounding_record(i))
        if i < n_understanding:
            records.append(understanding_record(i))
    data = root / "train.json"
    data.write_text(json.dumps(records, indent=1))
    return data, images

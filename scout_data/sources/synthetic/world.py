"""The synthetic world's vocabulary: colours, sizes, shapes (drawn as masks), relations, superlatives."""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import ImageDraw

NAME = "synthetic"
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "orange": (245, 140, 20),
    "purple": (140, 60, 180),
    "pink": (240, 120, 190),
    "brown": (130, 80, 35),
    "black": (25, 25, 25),
    "cyan": (30, 200, 215),
}
BACKGROUNDS = ((245, 245, 240), (235, 240, 245), (240, 234, 222), (228, 236, 228), (250, 250, 250))
SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.11), "medium": (0.14, 0.18), "large": (0.22, 0.27)}
GRID_FILL = {"small": 0.5, "medium": 0.7, "large": 0.9}  # an object's side as a share of its cell (``--grid``)
PLURALS = {"cross": "crosses"}
REL_WORDS = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "below": "below",
    "nearest": "nearest to",
}
SUPERLATIVES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")
CLUTTER = ("none", "noise", "lines", "texture")

def _poly(cx: float, cy: float, r: float, n: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(d: ImageDraw.ImageDraw, s: int) -> None:
    c = (s - 1) / 2
    outer, inner = _poly(c, c, c, 5), _poly(c, c, c * 0.42, 5, -math.pi / 2 + math.pi / 5)
    d.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)


def _cross(d: ImageDraw.ImageDraw, s: int) -> None:
    t = s / 3
    d.rectangle([t, 0, s - 1 - t, s - 1], fill=255)
    d.rectangle([0, t, s - 1, s - 1 - t], fill=255)


def _heart(d: ImageDraw.ImageDraw, s: int) -> None:
    r = s / 4
    d.ellipse([0, 0, 2 * r, 2 * r], fill=255)
    d.ellipse([s - 1 - 2 * r, 0, s - 1, 2 * r], fill=255)
    d.polygon([(0.03 * s, 1.35 * r), (s - 1 - 0.03 * s, 1.35 * r), ((s - 1) / 2, s - 1)], fill=255)


def _house(d: ImageDraw.ImageDraw, s: int) -> None:
    d.polygon([(0, 0.45 * s), ((s - 1) / 2, 0), (s - 1, 0.45 * s)], fill=255)
    d.rectangle([0.15 * s, 0.45 * s, 0.85 * s, s - 1], fill=255)


def _tree(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rectangle([0.42 * s, 0.55 * s, 0.58 * s, s - 1], fill=255)
    d.ellipse([0.08 * s, 0, 0.92 * s, 0.68 * s], fill=255)


def _car(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rectangle([0.22 * s, 0.2 * s, 0.72 * s, 0.45 * s], fill=255)
    d.rectangle([0, 0.42 * s, s - 1, 0.7 * s], fill=255)
    d.ellipse([0.1 * s, 0.58 * s, 0.34 * s, 0.82 * s], fill=255)
    d.ellipse([0.66 * s, 0.58 * s, 0.9 * s, 0.82 * s], fill=255)


def _moon(d: ImageDraw.ImageDraw, s: int) -> None:
    d.ellipse([0, 0, s - 1, s - 1], fill=255)
    d.ellipse([0.35 * s, -0.1 * s, 1.25 * s, 0.9 * s], fill=0)


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, int], None]] = {
    "circle": lambda d, s: d.ellipse([0, 0, s - 1, s - 1], fill=255),
    "square": lambda d, s: d.rectangle([0, 0, s - 1, s - 1], fill=255),
    "triangle": lambda d, s: d.polygon([((s - 1) / 2, 0), (s - 1, s - 1), (0, s - 1)], fill=255),
    "diamond": lambda d, s: d.polygon(
        [((s - 1) / 2, 0), (s - 1, (s - 1) / 2), ((s - 1) / 2, s - 1), (0, (s - 1) / 2)], fill=255
    ),
    "star": _star,
    "hexagon": lambda d, s: d.polygon(_poly((s - 1) / 2, (s - 1) / 2, (s - 1) / 2, 6, 0.0), fill=255),
    "cross": _cross,
    "heart": _heart,
    "house": _house,
    "tree": _tree,
    "car": _car,
    "moon": _moon,
}


def plural(word: str) -> str:
    return PLURALS.get(word, word + "s")

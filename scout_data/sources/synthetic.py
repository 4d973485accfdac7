"""Synthetic scenes by controllable composition: exact boxes, any quantity, no download.

A scene is a canvas (optionally non-square, with background clutter) holding shapes and simple objects,
each with a colour and a size class. An object's box is the tight box of the pixels drawn for it
(``mask.getbbox()``), so it is exact by construction. Queries are built as specs (description,
relation/anchor, superlative) and resolved against the scene; a sample is kept only when the
resolution picks exactly the intended objects and every box is inside the image with area.

Determinism: every record draws from its own ``random.Random("scout-synth:{seed}:{split}:{index}:...")``
stream, so the same seed gives byte-identical JSON and images, resuming regenerates nothing that was
written, and splits never share a scene (the split name is part of every scene's seed).
"""

from __future__ import annotations

import argparse
import math
import os
import random
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from scout_data.boxes import Box, box_problem_px, iou
from scout_data.chain import answer_line, step_line
from scout_data.schema import BOX_SLOT, Sample, Skip, Step
from scout_data.writer import PHRASES, REGION_PROMPT, STEP_BY_STEP, item_list, phrase, slots

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
CHAIN_STYLES = ("full", "terse")
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
KINDS = ("refexp", "find_all", "count", "grounded_caption", "region", "qa")
REFEXP_TYPES = ("attribute", "relation", "superlative")
QA_TYPES = ("colour", "shape", "count", "exists", "relation", "caption")
SHORT_ANSWER = "Answer the question using a single word or phrase."

REFEXP_QUERIES = ("Where is {ref}?", "Find {ref}.", "Locate {ref}.", "Point out {ref}.")
FIND_ALL_QUERIES = (
    "Find all the {plural}.",
    "Locate every {one} in the image.",
    "Where are all the {plural}?",
)
COUNT_QUERIES = (
    "How many {plural} are there?",
    "Count the {plural} in the image.",
    "How many {plural} do you see?",
)
CAPTION_QUERIES = (
    "Describe the image and locate each object you mention.",
    "Give a short caption with a box for every object.",
    "What is in the image? Give the box of each object.",
)
CAPTION_ANSWERS = ("From left to right: {items}.", "The image shows, from left to right, {items}.")
QA_QUERIES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is {ref}?", "What is the colour of {ref}?"),
    "shape": ("What is {ref}?", "What kind of object is {ref}?"),
    "count": ("How many {plural} are there?", "How many {plural} are in the image?"),
    "exists": ("Is there a {one} in the image?", "Can you see a {one}?"),
    "relation": ("Is {ref} {rel} {ref2}?",),
    "caption": ("Describe the image briefly.", "What does the image show?"),
}
CAPTION_QA_ANSWERS = ("{n} objects: {items}.", "A plain background with {items}.")


# ---------------------------------------------------------------- shapes


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


# ---------------------------------------------------------------- config


@dataclass
class SynthConfig:
    width: int = 336
    height: int = 336
    random_aspect: bool = False
    aspect_range: tuple[float, float] = (0.5, 2.0)
    shapes: tuple[str, ...] = tuple(SHAPES)
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    min_objects: int = 3
    max_objects: int = 8
    max_overlap: float = 0.0  # max IoU between two objects' boxes; 0: never touch (min_gap px apart)
    min_gap: int = 2
    distractor_rate: float = 0.5  # chance a new object copies an existing one's shape (and maybe colour)
    clutter: tuple[str, ...] = CLUTTER
    clutter_strength: float = 0.5
    kinds: dict[str, float] = field(
        default_factory=lambda: {"refexp": 0.4, "find_all": 0.2, "count": 0.2, "grounded_caption": 0.2}
    )
    refexp_types: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in REFEXP_TYPES})
    qa_types: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in QA_TYPES})
    image_format: str = "png"
    jpeg_quality: int = 90
    max_attempts: int = 20
    grid: int = 0  # > 0: objects centred in distinct cells of a grid x grid layout (few box values)
    chain_style: str = "full"  # terse: a step per described object with its box, then the answer


def parse_weights(text: str, allowed: tuple[str, ...], what: str) -> dict[str, float]:
    """``"refexp:0.4,count:0.6"`` -> weights; a bare name weighs 1."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, w = part.partition(":")
        if name not in allowed:
            raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"bad weight {w!r} for {what} {name!r}") from None
        if out[name] < 0:
            raise ValueError(f"negative weight for {what} {name!r}")
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"no {what} with a positive weight in {text!r}")
    return out


def parse_image_size(text: str) -> tuple[int, int]:
    """``"336"`` -> (336, 336); ``"448x336"`` -> (448, 336) (width x height)."""
    try:
        w, _, h = text.lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise ValueError(f"--image-size must be N or WxH, got {text!r}") from None
    if min(size) < 32:
        raise ValueError(f"--image-size must be at least 32 px, got {text!r}")
    return size


def _names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("synthetic scenes")
    g.add_argument("--num", type=int, default=1000, help="records in all splits together")
    g.add_argument(
        "--splits", default="train:0.9,val:0.05,test:0.05",
        help="split:fraction pairs, comma-separated, summing to 1 (default %(default)s)",
    )
    g.add_argument("--image-size", default="336", help="N (square) or WxH")
    g.add_argument("--random-aspect", action="store_true", help="random aspect ratio per scene, same area")
    g.add_argument("--aspect-range", default="0.5,2.0", help="min,max width/height with --random-aspect")
    g.add_argument(
        "--kinds",
        default="refexp:0.4,find_all:0.2,count:0.2,grounded_caption:0.2",
        help=f"kind mix, from {', '.join(KINDS)}",
    )
    g.add_argument("--refexp-types", default="attribute:1,relation:1,superlative:1")
    g.add_argument("--qa-types", default=",".join(f"{t}:1" for t in QA_TYPES))
    g.add_argument("--shapes", default=",".join(SHAPES))
    g.add_argument("--colours", "--colors", dest="colours", default=",".join(COLOURS))
    g.add_argument("--sizes", default=",".join(SIZES))
    g.add_argument("--min-objects", type=int, default=3)
    g.add_argument("--max-objects", type=int, default=8)
    g.add_argument("--max-overlap", type=float, default=0.0, help="max IoU of two objects (0: apart)")
    g.add_argument("--min-gap", type=int, default=2, help="px between objects when --max-overlap is 0")
    g.add_argument(
        "--distractor-rate",
        type=float,
        default=0.5,
        help="chance an object repeats the shape (and maybe colour) of another",
    )
    g.add_argument("--clutter", default=",".join(CLUTTER), help=f"background styles drawn from {CLUTTER}")
    g.add_argument("--clutter-strength", type=float, default=0.5)
    g.add_argument(
        "--grid", type=int, default=0,
        help="place objects centred in distinct cells of an N x N grid, so each box coordinate takes a few "
        "values (0: anywhere, the default)",
    )
    g.add_argument(
        "--chain-style", choices=CHAIN_STYLES, default="full",
        help="full: worded steps (the default); terse: one step per described object with its box, then the "
        "answer, for small worlds and models",
    )
    g.add_argument("--image-format", choices=("png", "jpg"), default="png")
    g.add_argument("--jpeg-quality", type=int, default=90)
    g.add_argument("--workers", type=int, default=1, help="processes rendering scenes")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    w, h = parse_image_size(str(args.image_size))
    lo, _, hi = str(args.aspect_range).partition(",")
    cfg = SynthConfig(
        width=w,
        height=h,
        random_aspect=bool(args.random_aspect),
        aspect_range=(float(lo), float(hi or lo)),
        shapes=_names(args.shapes, tuple(SHAPES), "shape"),
        colours=_names(args.colours, tuple(COLOURS), "colour"),
        sizes=_names(args.sizes, tuple(SIZES), "size"),
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        max_overlap=args.max_overlap,
        min_gap=args.min_gap,
        distractor_rate=args.distractor_rate,
        clutter=_names(args.clutter, CLUTTER, "clutter style"),
        clutter_strength=args.clutter_strength,
        kinds=parse_weights(args.kinds, KINDS, "kind"),
        refexp_types=parse_weights(args.refexp_types, REFEXP_TYPES, "refexp type"),
        qa_types=parse_weights(args.qa_types, QA_TYPES, "qa type"),
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
        grid=args.grid,
        chain_style=args.chain_style,
    )
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        raise ValueError("need 1 <= --min-objects <= --max-objects")
    if not 0 < cfg.aspect_range[0] <= cfg.aspect_range[1]:
        raise ValueError("--aspect-range must be min,max with 0 < min <= max")
    if cfg.grid < 0 or (cfg.grid and cfg.grid * cfg.grid < cfg.max_objects):
        raise ValueError("--grid N needs N >= 0 and N * N >= --max-objects")
    if cfg.grid and min(w, h) < 8 * cfg.grid:
        raise ValueError(f"--grid {cfg.grid} leaves cells under 8 px in a {w}x{h} image")
    return cfg


def split_counts(num: int, splits: str) -> dict[str, int]:
    """``--num`` spread over splits by fraction; the first split takes the rounding remainder."""
    fr = parse_weights(splits, ("train", "val", "test"), "split")
    total = sum(fr.values())
    names = list(fr)
    counts = {n: int(round(num * fr[n] / total)) for n in names[1:]}
    counts = {names[0]: max(0, num - sum(counts.values())), **counts}
    return {n: counts[n] for n in names}


# ---------------------------------------------------------------- scenes


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    box: Box  # pixel xyxy, the tight extent of the drawn pixels
    area: int  # drawn pixels
    offset: tuple[int, int]
    mask: Image.Image = field(repr=False)

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    def words(self, size: bool = False) -> str:
        return f"{self.size} {self.colour} {self.shape}" if size else f"{self.colour} {self.shape}"


@dataclass
class Scene:
    width: int
    height: int
    objects: list[Obj]


def _fits(box: Box, placed: list[Obj], cfg: SynthConfig) -> bool:
    if cfg.max_overlap <= 0:
        g = cfg.min_gap
        return all(
            box[2] + g <= o.box[0]
            or o.box[2] + g <= box[0]
            or box[3] + g <= o.box[1]
            or o.box[3] + g <= box[1]
            for o in placed
        )
    return all(iou(box, o.box) <= cfg.max_overlap for o in placed)


def shape_mask(shape: str, side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    SHAPES[shape](ImageDraw.Draw(mask), side)
    return mask


def _canvas_size(rng: random.Random, cfg: SynthConfig) -> tuple[int, int]:
    if not cfg.random_aspect:
        return cfg.width, cfg.height
    area = cfg.width * cfg.height
    lo, hi = cfg.aspect_range
    ratio = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return max(32, int(round(math.sqrt(area * ratio)))), max(32, int(round(math.sqrt(area / ratio))))


def _pick_look(rng: random.Random, cfg: SynthConfig, objects: list[Obj]) -> tuple[str, str]:
    """A new object's shape and colour; with ``distractor_rate`` it repeats an existing object's shape."""
    if objects and rng.random() < cfg.distractor_rate:
        src = rng.choice(objects)
        return src.shape, src.colour if rng.random() < 0.5 else rng.choice(cfg.colours)
    return rng.choice(cfg.shapes), rng.choice(cfg.colours)


def _placed(shape: str, colour: str, size: str, side: int, x0: int, y0: int) -> Obj | None:
    mask = shape_mask(shape, side)
    bx = mask.getbbox()
    if bx is None:
        return None
    box = (float(x0 + bx[0]), float(y0 + bx[1]), float(x0 + bx[2]), float(y0 + bx[3]))
    return Obj(shape, colour, size, box, int(np.count_nonzero(np.asarray(mask))), (x0, y0), mask)


def _grid_scene(rng: random.Random, cfg: SynthConfig, w: int, h: int) -> Scene:
    """Objects centred in distinct cells of a ``cfg.grid`` x ``cfg.grid`` layout, sized by :data:`GRID_FILL`."""
    g = cfg.grid
    cw, ch = w // g, h // g
    objects: list[Obj] = []
    for cell in rng.sample(range(g * g), rng.randint(cfg.min_objects, cfg.max_objects)):
        shape, colour = _pick_look(rng, cfg, objects)
        size = rng.choice(cfg.sizes)
        side = max(4, int(round(min(cw, ch) * GRID_FILL[size])))
        col, row = cell % g, cell // g
        o = _placed(shape, colour, size, side, col * cw + (cw - side) // 2, row * ch + (ch - side) // 2)
        if o is not None:
            objects.append(o)
    return Scene(w, h, objects)


def make_scene(rng: random.Random, cfg: SynthConfig) -> Scene:
    """Objects with exact boxes (no pixels drawn on a canvas yet)."""
    w, h = _canvas_size(rng, cfg)
    if cfg.grid:
        return _grid_scene(rng, cfg, w, h)
    base = min(w, h)
    objects: list[Obj] = []
    for _ in range(rng.randint(cfg.min_objects, cfg.max_objects)):
        shape, colour = _pick_look(rng, cfg, objects)
        size = rng.choice(cfg.sizes)
        side = max(6, int(round(base * rng.uniform(*SIZES[size]))))
        if side > min(w, h):
            continue
        at_origin = _placed(shape, colour, size, side, 0, 0)
        if at_origin is None:
            continue
        for _try in range(40):
            x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
            box = tuple(v + d for v, d in zip(at_origin.box, (x0, y0, x0, y0), strict=True))
            if _fits(box, objects, cfg):
                objects.append(replace(at_origin, box=box, offset=(x0, y0)))
                break
    return Scene(w, h, objects)


def _background(rng: random.Random, w: int, h: int, cfg: SynthConfig) -> Image.Image:
    base = rng.choice(BACKGROUNDS)
    style = rng.choice(cfg.clutter)
    nrng = np.random.default_rng(rng.getrandbits(64))
    amp = max(1, int(40 * cfg.clutter_strength))
    if style in ("noise", "texture"):
        if style == "noise":
            shade = nrng.integers(-amp, amp + 1, size=(h, w, 1), dtype=np.int16)
        else:
            cell = rng.randint(6, 24)
            yy, xx = np.ogrid[0:h, 0:w]
            pattern = ((xx // cell + yy // cell) % 2) if rng.random() < 0.5 else ((xx + yy) // cell % 2)
            shade = -(pattern[..., None] * (amp // 2 + 1)).astype(np.int16)
        arr = np.clip(shade + np.array(base, dtype=np.int16), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "RGB")
    im = Image.new("RGB", (w, h), base)
    if style == "lines":
        d = ImageDraw.Draw(im)
        for _ in range(rng.randint(3, 12)):
            tone = rng.randint(175, 225)
            pts = [(rng.randint(0, w - 1), rng.randint(0, h - 1)) for _ in range(2)]
            d.line(pts, fill=(tone, tone, tone - rng.randint(0, 15)), width=rng.randint(1, 2))
    return im


def render_scene(scene: Scene, rng: random.Random, cfg: SynthConfig) -> Image.Image:
    """Background (with clutter) then every object in order; objects keep their exact colour."""
    im = _background(rng, scene.width, scene.height, cfg)
    for o in scene.objects:
        x0, y0 = o.offset
        side = o.mask.size[0]
        im.paste(COLOURS[o.colour], (x0, y0, x0 + side, y0 + side), o.mask)
    return im


# ---------------------------------------------------------------- queries


@dataclass(frozen=True)
class Desc:
    """What a noun phrase says about an object; ``None`` fields are unconstrained."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def matches(self, o: Obj) -> bool:
        return all(
            v is None or v == getattr(o, k)
            for k, v in (("shape", self.shape), ("colour", self.colour), ("size", self.size))
        )

    def words(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape or "object") if w)

    def plural(self) -> str:
        return " ".join(w for w in (self.size, self.colour, plural(self.shape or "object")) if w)


@dataclass(frozen=True)
class Query:
    desc: Desc
    relation: str | None = None  # key of REL_WORDS
    anchor: int | None = None  # object index
    superlative: str | None = None


def _relation_holds(rel: str, o: Obj, a: Obj) -> bool:
    return {
        "left": o.box[2] <= a.box[0],
        "right": o.box[0] >= a.box[2],
        "above": o.box[3] <= a.box[1],
        "below": o.box[1] >= a.box[3],
    }[rel]


def _extreme(idx: list[int], key: Callable[[int], float], margin: float) -> list[int]:
    """The index with the largest ``key`` if it beats the runner-up by ``margin``, else nothing."""
    ranked = sorted(idx, key=key, reverse=True)
    if len(ranked) == 1 or key(ranked[0]) - key(ranked[1]) >= margin:
        return ranked[:1]
    return []


def resolve(q: Query, scene: Scene) -> list[int]:
    """Indices of the objects the query refers to (empty when it is ambiguous)."""
    objs = scene.objects
    cands = [i for i, o in enumerate(objs) if q.desc.matches(o) and i != q.anchor]
    if q.relation and q.anchor is not None:
        a = objs[q.anchor]
        if q.relation == "nearest":
            dist = {i: math.hypot(objs[i].cx - a.cx, objs[i].cy - a.cy) for i in cands}
            ranked = sorted(cands, key=dist.__getitem__)
            if len(ranked) >= 2 and dist[ranked[1]] < 1.3 * dist[ranked[0]]:
                return []
            cands = ranked[:1]
        else:
            cands = [i for i in cands if _relation_holds(q.relation, objs[i], a)]
    if q.superlative:
        pos = 0.05 * max(scene.width, scene.height)
        keys: dict[str, tuple[Callable[[int], float], float]] = {
            "largest": (lambda i: math.log(objs[i].area), math.log(1.3)),
            "smallest": (lambda i: -math.log(objs[i].area), math.log(1.3)),
            "leftmost": (lambda i: -objs[i].cx, pos),
            "rightmost": (lambda i: objs[i].cx, pos),
            "topmost": (lambda i: -objs[i].cy, pos),
            "bottommost": (lambda i: objs[i].cy, pos),
        }
        key, margin = keys[q.superlative]
        cands = _extreme(cands, key, margin) if cands else []
    return cands


def _descs_for(o: Obj) -> list[Desc]:
    return [
        Desc(shape=o.shape),
        Desc(shape=o.shape, colour=o.colour),
        Desc(colour=o.colour),
        Desc(shape=o.shape, size=o.size),
        Desc(shape=o.shape, colour=o.colour, size=o.size),
    ]


def unique_desc(
    scene: Scene, i: int, rng: random.Random | None = None, exclude: str | None = None
) -> Desc | None:
    """The shortest description that picks object ``i`` alone (ties broken by ``rng``)."""
    options = [d for d in _descs_for(scene.objects[i]) if exclude is None or getattr(d, exclude) is None]
    if rng is not None:
        rng.shuffle(options)
    options.sort(key=lambda d: sum(v is not None for v in (d.shape, d.colour, d.size)))
    for d in options:
        if resolve(Query(d), scene) == [i]:
            return d
    return None


def ref_text(q: Query, scene: Scene, anchor_desc: Desc | None = None) -> str:
    """``the red circle``, ``the circle left of the blue star``, ``the largest red object``."""
    words = q.desc.words()
    if q.superlative:
        words = f"{q.superlative} {words}"
    text = f"the {words}"
    if q.relation and anchor_desc is not None:
        text += f" {REL_WORDS[q.relation]} the {anchor_desc.words()}"
    return text


def _same_category(scene: Scene, i: int) -> list[int]:
    return [j for j, o in enumerate(scene.objects) if o.shape == scene.objects[i].shape]


def _candidate_step(rng: random.Random, scene: Scene, idx: list[int]) -> Step:
    objs = scene.objects
    idx = sorted(idx, key=lambda j: (objs[j].cx, objs[j].cy))
    key = "candidates_one" if len(idx) == 1 else "candidates"
    return Step(phrase(rng, key, items=item_list([objs[j].words() for j in idx])), [objs[j].box for j in idx])


@dataclass
class Built:
    """A generated query: the sample's text parts and the objects its answer must be."""

    kind: str
    query: str
    steps: list[Step]
    targets: list[int]
    answer_text: str = ""
    difficulty: str = "simple"
    task: str = "grounding"
    answer_boxes: list[Box] | None = None  # default: the targets' boxes
    expression: str = ""


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, [weights[n] for n in names])[0]


def _refexp_attribute(rng: random.Random, scene: Scene) -> tuple[Query, Desc | None, str] | None:
    order = list(range(len(scene.objects)))
    rng.shuffle(order)
    for i in order:
        d = unique_desc(scene, i, rng)
        if d is not None:
            return Query(d), None, "hard" if len(_same_category(scene, i)) > 1 else "simple"
    return None


def _refexp_relation(rng: random.Random, scene: Scene) -> tuple[Query, Desc | None, str] | None:
    objs = scene.objects
    n = len(objs)
    tries = [(i, a) for i in range(n) for a in range(n) if i != a]
    rng.shuffle(tries)
    rels = list(REL_WORDS)
    for i, a in tries[:60]:
        a_desc = unique_desc(scene, a, rng)
        if a_desc is None:
            continue
        descs = [Desc(shape=objs[i].shape), Desc(shape=objs[i].shape, colour=objs[i].colour)]
        rng.shuffle(descs)
        descs.sort(key=lambda d: -sum(d.matches(o) for o in objs))
        for d in descs:
            if d.matches(objs[a]) or sum(d.matches(o) for o in objs) < 2:
                continue
            rng.shuffle(rels)
            for rel in rels:
                q = Query(d, rel, a)
                if resolve(q, scene) == [i]:
                    return q, a_desc, "hard"
    return None


def _refexp_superlative(rng: random.Random, scene: Scene) -> tuple[Query, Desc | None, str] | None:
    objs = scene.objects
    descs = {Desc()} | {
        d for o in objs for d in (Desc(shape=o.shape), Desc(colour=o.colour), Desc(o.shape, o.colour))
    }
    options = [(d, s) for d in sorted(descs, key=lambda d: d.words()) for s in SUPERLATIVES]
    rng.shuffle(options)
    for d, sup in options:
        if sum(d.matches(o) for o in objs) < 2:
            continue
        q = Query(d, superlative=sup)
        if len(resolve(q, scene)) == 1:
            return q, None, "hard"
    return None


REFEXP_BUILDERS = {
    "attribute": _refexp_attribute,
    "relation": _refexp_relation,
    "superlative": _refexp_superlative,
}


def _located(scene: Scene, idx: list[int], rng: random.Random) -> list[Step]:
    """Terse steps: each object, left to right, named as a one-shot region prompt would name it, with its box."""
    objs = scene.objects
    steps = []
    for j in sorted(idx, key=lambda j: (objs[j].cx, objs[j].cy)):
        d = unique_desc(scene, j, rng) or Desc(objs[j].shape, objs[j].colour, objs[j].size)
        steps.append(Step(f"the {d.words()} {BOX_SLOT}", [objs[j].box]))
    return steps


def _refexp_candidates(scene: Scene, q: Query, target: int) -> list[int]:
    objs = scene.objects
    if q.relation:
        return [j for j, o in enumerate(objs) if q.desc.matches(o) and j != q.anchor]
    if q.superlative:
        return [j for j, o in enumerate(objs) if q.desc.matches(o)]
    if q.desc.shape is not None:
        return _same_category(scene, target)
    return list(range(len(objs)))


def _refexp_steps(
    rng: random.Random, scene: Scene, q: Query, anchor_desc: Desc | None, target: int, terse: bool = False
) -> list[Step]:
    """The chain of a referring expression. Terse: the anchor (relations), then every candidate, each located;
    the answer line then picks the target."""
    objs = scene.objects
    box = objs[target].box
    cands = _refexp_candidates(scene, q, target)
    if terse:
        anchor = [q.anchor] if q.relation and q.anchor is not None else []
        return _located(scene, anchor, rng) + _located(scene, cands, rng)
    steps = [Step(phrase(rng, "asks", target=ref_text(q, scene, anchor_desc)))]
    steps.append(_candidate_step(rng, scene, cands))
    if q.relation and q.anchor is not None and anchor_desc is not None:
        steps.append(
            Step(phrase(rng, "anchor", anchor=anchor_desc.words(), box="<box>"), [objs[q.anchor].box])
        )
        steps.append(
            Step(
                phrase(
                    rng,
                    "pick_relation",
                    relation=REL_WORDS[q.relation],
                    anchor=anchor_desc.words(),
                    box="<box>",
                ),
                [box],
            )
        )
    elif q.superlative:
        steps.append(Step(phrase(rng, "pick_superlative", superlative=q.superlative, box="<box>"), [box]))
    elif len(cands) == 1:
        steps.append(Step(phrase(rng, "pick_only", box="<box>"), [box]))
    else:
        attribute = " ".join(w for w in (q.desc.size, q.desc.colour) if w) or (q.desc.shape or "")
        steps.append(Step(phrase(rng, "pick_attribute", attribute=attribute, box="<box>"), [box]))
    return steps


def _build_refexp(rng: random.Random, scene: Scene, cfg: SynthConfig, region: bool = False) -> Built | None:
    types = dict(cfg.refexp_types)
    while types:
        t = _pick(rng, types)
        got = REFEXP_BUILDERS[t](rng, scene)
        if got is not None:
            break
        del types[t]
    else:
        return None
    q, anchor_desc, difficulty = got
    targets = resolve(q, scene)
    ref = ref_text(q, scene, anchor_desc)
    if region:
        return Built("region", ref, [], targets, difficulty=difficulty)
    query = rng.choice(REFEXP_QUERIES).format(ref=ref)
    return Built(
        "refexp", query, _refexp_steps(rng, scene, q, anchor_desc, targets[0], cfg.chain_style == "terse"), targets,
        difficulty=difficulty,
        expression=ref,
    )


def _group_desc(rng: random.Random, scene: Scene, min_count: int) -> Desc | None:
    objs = scene.objects
    descs = sorted(
        {d for o in objs for d in (Desc(shape=o.shape), Desc(o.shape, o.colour), Desc(colour=o.colour))},
        key=lambda d: d.words(),
    )
    rng.shuffle(descs)
    descs.sort(key=lambda d: -min(sum(d.matches(o) for o in objs), 3))
    good = [d for d in descs if sum(d.matches(o) for o in objs) >= min_count]
    return good[0] if good else None


def _build_group(rng: random.Random, scene: Scene, kind: str, terse: bool = False) -> Built | None:
    objs = scene.objects
    d = _group_desc(rng, scene, 2 if kind == "find_all" else 1)
    if d is None:
        return None
    q = Query(d)
    targets = sorted(resolve(q, scene), key=lambda j: (objs[j].cx, objs[j].cy))
    one, many = d.words(), d.plural()
    if d.shape is not None:
        cands = [j for j, o in enumerate(objs) if o.shape == d.shape]
    else:
        cands = list(range(len(objs)))
    hard = len(cands) > len(targets)
    boxes = [objs[j].box for j in targets]
    if terse:
        steps = _located(scene, cands, rng)
    elif kind == "find_all":
        steps = [
            Step(phrase(rng, "asks_all", target=one, targets=many)),
            _candidate_step(rng, scene, cands),
            Step(phrase(rng, "matches", targets=many, boxes=slots(len(targets))), boxes),
        ]
    else:
        steps = [
            Step(phrase(rng, "asks_count", target=one, targets=many)),
            _candidate_step(rng, scene, cands),
        ]
        if hard:
            steps.append(Step(phrase(rng, "matches", targets=many, boxes=slots(len(targets))), boxes))
        steps.append(Step(phrase(rng, "count_total", count=len(targets))))
    if kind == "find_all":
        query = rng.choice(FIND_ALL_QUERIES).format(plural=many, one=one)
        return Built("find_all", query, steps, targets, difficulty="hard")
    query = rng.choice(COUNT_QUERIES).format(plural=many)
    return Built(
        "count", query, steps, targets, answer_text=str(len(targets)), difficulty="hard" if hard else "simple"
    )


def _build_caption(rng: random.Random, scene: Scene) -> Built | None:
    objs = scene.objects
    order = sorted(range(len(objs)), key=lambda j: (objs[j].cx, objs[j].cy))
    names = [f"a {objs[j].words(size=True)}" for j in order]
    steps = [Step(phrase(rng, "asks_caption")), Step(phrase(rng, "caption_plan", count=len(objs)))]
    answer = rng.choice(CAPTION_ANSWERS).format(items=item_list(names))
    return Built("grounded_caption", rng.choice(CAPTION_QUERIES), steps, order, answer_text=answer)


def _number_word(n: int) -> str:
    return str(n)


def _build_qa(rng: random.Random, scene: Scene, cfg: SynthConfig) -> Built | None:
    objs = scene.objects
    types = dict(cfg.qa_types)
    while types:
        t = _pick(rng, types)
        del types[t]
        order = list(range(len(objs)))
        rng.shuffle(order)
        query = answer = None
        if t in ("colour", "shape"):
            for i in order:
                d = unique_desc(scene, i, rng, exclude=t if t == "colour" else "shape")
                if d is not None:
                    query = rng.choice(QA_QUERIES[t]).format(ref=f"the {d.words()}")
                    answer = objs[i].colour if t == "colour" else objs[i].shape
                    break
        elif t == "count":
            d = (
                _group_desc(rng, scene, 1)
                if rng.random() < 0.8
                else Desc(rng.choice(cfg.shapes), rng.choice(cfg.colours))
            )
            if d is not None:
                query = rng.choice(QA_QUERIES[t]).format(plural=d.plural())
                answer = _number_word(len(resolve(Query(d), scene)))
        elif t == "exists":
            o = objs[order[0]]
            d = (
                Desc(o.shape, o.colour)
                if rng.random() < 0.5
                else Desc(rng.choice(cfg.shapes), rng.choice(cfg.colours))
            )
            query = rng.choice(QA_QUERIES[t]).format(one=d.words())
            answer = "Yes" if resolve(Query(d), scene) else "No"
        elif t == "relation":
            for i, a in ((i, a) for i in order for a in order if i != a):
                di, da = unique_desc(scene, i, rng), unique_desc(scene, a, rng)
                rel = rng.choice(("left", "right", "above", "below"))
                inverse = {"left": "right", "right": "left", "above": "below", "below": "above"}[rel]
                if di is None or da is None:
                    continue
                if _relation_holds(rel, objs[i], objs[a]) or _relation_holds(inverse, objs[i], objs[a]):
                    query = rng.choice(QA_QUERIES[t]).format(
                        ref=f"the {di.words()}", rel=REL_WORDS[rel], ref2=f"the {da.words()}"
                    )
                    answer = "Yes" if _relation_holds(rel, objs[i], objs[a]) else "No"
                    break
        else:
            order = sorted(order, key=lambda j: objs[j].cx)
            items = item_list([f"a {objs[j].words()}" for j in order], with_boxes=False)
            query = rng.choice(QA_QUERIES["caption"])
            answer = rng.choice(CAPTION_QA_ANSWERS).format(n=len(objs), items=items)
            return Built(
                "qa", query, [], [], answer_text=answer[0].upper() + answer[1:], task="understanding"
            )
        if query is not None and answer is not None:
            return Built("qa", f"{query} {SHORT_ANSWER}", [], [], answer_text=answer, task="understanding")
    return None


def build_query(rng: random.Random, scene: Scene, kind: str, cfg: SynthConfig) -> Built | None:
    """A query of ``kind`` about ``scene`` and its chain, or None when the scene does not allow one."""
    if not scene.objects:
        return None
    if kind in ("refexp", "region"):
        return _build_refexp(rng, scene, cfg, region=kind == "region")
    if kind in ("find_all", "count"):
        return _build_group(rng, scene, kind, cfg.chain_style == "terse")
    if kind == "grounded_caption":
        return _build_caption(rng, scene)
    return _build_qa(rng, scene, cfg)


def check_built(b: Built, scene: Scene) -> list[str]:
    """Why a built chain is wrong: a box outside the image or without area, answers not the referents."""
    problems = []
    boxes = [bx for s in b.steps for bx in s.boxes_xyxy_px] + [scene.objects[j].box for j in b.targets]
    for bx in boxes:
        p = box_problem_px(bx, scene.width, scene.height)
        if p:
            problems.append(p)
    for s in b.steps:
        if s.text.count("<box>") != len(s.boxes_xyxy_px):
            problems.append(f"step {s.text!r} has {len(s.boxes_xyxy_px)} boxes for its slots")
    if b.kind in ("refexp", "region") and len(b.targets) != 1:
        problems.append(f"{b.kind} resolves to {len(b.targets)} objects")
    return problems


# ---------------------------------------------------------------- records


@dataclass
class _Job:
    seed: int
    split: str
    index: int
    out_dir: str | None


def record_id(split: str, index: int) -> str:
    return f"synth-{split}-{index:07d}"


def generate(seed: int, split: str, index: int, cfg: SynthConfig) -> tuple[Sample | Skip, Scene | None]:
    """The sample for one record (no image written); the scene to render comes with it."""
    rid = record_id(split, index)
    kind = _pick(random.Random(f"scout-synth:{seed}:{split}:{index}:kind"), cfg.kinds)
    for attempt in range(cfg.max_attempts):
        rng = random.Random(f"scout-synth:{seed}:{split}:{index}:{attempt}")
        scene = make_scene(rng, cfg)
        b = build_query(rng, scene, kind, cfg)
        if b is None or check_built(b, scene):
            continue
        ext = "jpg" if cfg.image_format == "jpg" else "png"
        sample = Sample(
            id=rid,
            image=f"{split}/{rid}.{ext}",
            width=scene.width,
            height=scene.height,
            query=b.query,
            kind=b.kind,  # type: ignore[arg-type]
            task=b.task,  # type: ignore[arg-type]
            steps=b.steps,
            answer_boxes_xyxy_px=[scene.objects[j].box for j in b.targets],
            answer_text=b.answer_text,
            expression=b.expression,
            difficulty=b.difficulty,  # type: ignore[arg-type]
            split=split,
            source=NAME,
            source_ids={
                "seed": seed,
                "index": index,
                "attempt": attempt,
                "targets": b.targets,
                "objects": [
                    {"shape": o.shape, "colour": o.colour, "size": o.size, "box_xyxy_px": list(o.box)}
                    for o in scene.objects
                ],
            },
        )
        return sample, scene
    return Skip(rid, f"no {kind} query fits a scene after {cfg.max_attempts} attempts"), None


def save_image(im: Image.Image, path: str, cfg: SynthConfig) -> None:
    """Atomic write: temp file in the same folder, then ``os.replace``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    if cfg.image_format == "jpg":
        im.save(tmp, format="JPEG", quality=cfg.jpeg_quality)
    else:
        im.save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def make_record(job: _Job, cfg: SynthConfig) -> Sample | Skip:
    got, scene = generate(job.seed, job.split, job.index, cfg)
    if isinstance(got, Sample) and scene is not None and job.out_dir is not None:
        attempt = got.source_ids["attempt"]
        im = render_scene(
            scene, random.Random(f"scout-synth:{job.seed}:{job.split}:{job.index}:{attempt}:render"), cfg
        )
        save_image(im, os.path.join(job.out_dir, got.image), cfg)
    return got


_WORKER_CFG: SynthConfig | None = None


def _init_worker(cfg: SynthConfig) -> None:
    global _WORKER_CFG
    _WORKER_CFG = cfg


def _work(job: _Job) -> Sample | Skip:
    assert _WORKER_CFG is not None
    return make_record(job, _WORKER_CFG)


def image_folder(args: argparse.Namespace) -> str:
    """The folder to pass to LLaVA as ``--image_folder`` (image paths in the JSON are relative to it)."""
    return os.path.join(args.out, "images")


def estimate_total(args: argparse.Namespace) -> int:
    return int(args.num)


def iter_samples(args: argparse.Namespace) -> Iterator[Sample | Skip]:
    """Samples for every split (images written under ``image_folder(args)``); ids in ``args.skip_ids``
    (set by ``--resume``) are neither generated nor yielded."""
    cfg = config_from_args(args)
    skip: Container[str] = getattr(args, "skip_ids", None) or ()
    folder = image_folder(args) if getattr(args, "out", None) else None
    jobs = [
        _Job(int(args.seed), split, i, folder)
        for split, n in split_counts(int(args.num), args.splits).items()
        for i in range(n)
        if record_id(split, i) not in skip
    ]
    workers = max(1, int(getattr(args, "workers", 1) or 1))
    if workers == 1 or len(jobs) < 64:
        for job in jobs:
            yield make_record(job, cfg)
        return
    import multiprocessing as mp

    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        yield from pool.imap(_work, jobs, chunksize=16)


# ---------------------------------------------------------------- tokenizer corpus


def vocabulary_text(seed: int = 0, n: int = 200) -> list[str]:
    """Strings covering every phrase the generator can produce: each template filled in, every word,
    and the prompts and answers of ``n`` generated records (kinds in turn), rendered as training text."""
    from scout_data.writer import render_gpt, render_human

    words = {
        "target": "the red circle",
        "targets": "red circles",
        "items": "red circle <box>",
        "box": "<box>",
        "boxes": "<box>, <box>",
        "anchor": "blue star",
        "attribute": "red",
        "relation": "left of",
        "superlative": "largest",
        "count": 3,
        "ref": "the red circle",
        "plural": "red circles",
        "one": "red circle",
        "rel": "left of",
        "ref2": "the blue star",
        "n": 3,
    }
    texts = [STEP_BY_STEP, SHORT_ANSWER, REGION_PROMPT.format(query="the red circle")]
    templates = [t for group in PHRASES.values() for t in group]
    templates += [
        *REFEXP_QUERIES,
        *FIND_ALL_QUERIES,
        *COUNT_QUERIES,
        *CAPTION_QUERIES,
        *CAPTION_ANSWERS,
        *CAPTION_QA_ANSWERS,
        *(t for g in QA_QUERIES.values() for t in g),
    ]
    texts += [t.format(**words) for t in templates]
    texts += [
        " ".join(
            [
                *COLOURS,
                *SHAPES,
                *(plural(s) for s in SHAPES),
                *SIZES,
                *SUPERLATIVES,
                *REL_WORDS.values(),
                "object",
                "objects",
                "Yes",
                "No",
            ]
        )
    ]
    texts += [step_line(i, "") for i in range(1, 8)] + [
        answer_line(""),
        "[0.00, 0.25, 0.50, 1.00]",
        "0 1 2 3 4 5 6 7 8 9",
    ]
    cfg = SynthConfig(qa_types={t: 1.0 for t in QA_TYPES})
    for k, kind in enumerate(KINDS):
        cfg.kinds = {kind: 1.0}
        for i in range(n // len(KINDS) + (k < n % len(KINDS))):
            got, _ = generate(seed, f"vocab-{kind}", i, cfg)
            if isinstance(got, Sample):
                texts += [render_human(got.query, got.kind), render_gpt(got)]
    return texts


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError on bad flags before anything is written."""
    config_from_args(args)
    split_counts(int(args.num), args.splits)
    if int(args.num) < 0:
        raise ValueError("--num must be >= 0")

"""Scenes: objects with exact boxes (free or on a grid), rendered over a background."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from scout_data.boxes import Box, iou
from scout_data.sources.synthetic.config import SynthConfig
from scout_data.sources.synthetic.world import BACKGROUNDS, COLOURS, GRID_FILL, SHAPES, SIZES


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

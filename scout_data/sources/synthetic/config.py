"""``scout_data synth``'s settings: :class:`SynthConfig`, its command-line flags and their checks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from scout_data.limits import WORKERS, Bounded
from scout_data.sources.synthetic.world import CLUTTER, COLOURS, SHAPES, SIZES

KINDS = ("refexp", "find_all", "count", "grounded_caption", "region", "qa", "region_caption")
REFEXP_TYPES = ("attribute", "relation", "superlative")
QA_TYPES = ("colour", "shape", "count", "exists", "relation", "caption")
CHAIN_STYLES = ("decide", "terse", "full")
# limits of the flags (stated in --help): a scene's cost grows with its area and its object count
MIN_SIDE, MAX_SIDE = 32, 4096
MIN_ASPECT, MAX_ASPECT = 0.125, 8.0
MAX_WEIGHT = 1e6
NUM = Bounded(int, 0, 10_000_000)
OBJECTS = Bounded(int, 1, 64)
UNIT = Bounded(float, 0, 1)
GAP = Bounded(int, 0, MAX_SIDE)
GRID = Bounded(int, 0, 64)
JPEG_QUALITY = Bounded(int, 1, 100)



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
    chain_style: str = "decide"  # see --chain-style


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
        if not 0 <= out[name] <= MAX_WEIGHT:
            raise ValueError(f"weight {w} for {what} {name!r}: expected a number in [0, {MAX_WEIGHT:g}]")
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"no {what} with a positive weight in {text!r}")
    return out


def parse_image_size(text: str) -> tuple[int, int]:
    """``"336"`` -> (336, 336); ``"448x336"`` -> (448, 336) (width x height); each side in [32, 4096]."""
    try:
        w, _, h = text.lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise ValueError(f"--image-size must be N or WxH, got {text!r}") from None
    if not MIN_SIDE <= min(size) <= max(size) <= MAX_SIDE:
        raise ValueError(f"--image-size {text}: each side must be in [{MIN_SIDE}, {MAX_SIDE}] px")
    return size


def _names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("synthetic scenes")
    g.add_argument("--num", type=NUM, default=1000, help=f"records in all splits together ({NUM})")
    g.add_argument(
        "--splits", default="train:0.9,val:0.05,test:0.05",
        help="split:fraction pairs, comma-separated, summing to 1 (default %(default)s)",
    )
    g.add_argument("--image-size", default="336", help=f"N (square) or WxH, each side in [{MIN_SIDE}, {MAX_SIDE}]")
    g.add_argument("--random-aspect", action="store_true", help="random aspect ratio per scene, same area")
    g.add_argument("--aspect-range", default="0.5,2.0",
                   help=f"min,max width/height with --random-aspect, both in [{MIN_ASPECT:g}, {MAX_ASPECT:g}]")
    g.add_argument(
        "--kinds",
        default="refexp:0.4,find_all:0.2,count:0.2,grounded_caption:0.2",
        help=f"kind mix, from {', '.join(KINDS)} (weights in [0, {MAX_WEIGHT:g}], as for the other mixes)",
    )
    g.add_argument("--refexp-types", default="attribute:1,relation:1,superlative:1")
    g.add_argument("--qa-types", default=",".join(f"{t}:1" for t in QA_TYPES))
    g.add_argument("--shapes", default=",".join(SHAPES))
    g.add_argument("--colours", "--colors", dest="colours", default=",".join(COLOURS))
    g.add_argument("--sizes", default=",".join(SIZES))
    g.add_argument("--min-objects", type=OBJECTS, default=3, help=f"objects per scene, at least ({OBJECTS})")
    g.add_argument("--max-objects", type=OBJECTS, default=8, help=f"objects per scene, at most ({OBJECTS})")
    g.add_argument("--max-overlap", type=UNIT, default=0.0, help=f"max IoU of two objects (0: apart; {UNIT})")
    g.add_argument("--min-gap", type=GAP, default=2, help=f"px between objects when --max-overlap is 0 ({GAP})")
    g.add_argument(
        "--distractor-rate",
        type=UNIT,
        default=0.5,
        help=f"chance an object repeats the shape (and maybe colour) of another ({UNIT})",
    )
    g.add_argument("--clutter", default=",".join(CLUTTER), help=f"background styles drawn from {CLUTTER}")
    g.add_argument("--clutter-strength", type=UNIT, default=0.5, help=f"how strong the clutter is ({UNIT})")
    g.add_argument(
        "--grid", type=GRID, default=0,
        help="place objects centred in distinct cells of an N x N grid, so each box coordinate takes a few "
        f"values (0: anywhere, the default; {GRID})",
    )
    g.add_argument(
        "--chain-style", choices=CHAIN_STYLES, default="decide",
        help="decide (the default): the candidates in the expression's words with their boxes, a relation's "
        "reference object with its box, then the pick ('the one it asks for') with the target's box, which the "
        "answer copies; terse: one step per object the query is about, named by its shortest unique description, then "
        "the answer; full: worded steps",
    )
    g.add_argument("--image-format", choices=("png", "jpg"), default="png")
    g.add_argument("--jpeg-quality", type=JPEG_QUALITY, default=90, help=f"with --image-format jpg ({JPEG_QUALITY})")
    g.add_argument("--workers", type=WORKERS, default=1, help=f"processes rendering scenes ({WORKERS})")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    w, h = parse_image_size(str(args.image_size))
    lo, _, hi = str(args.aspect_range).partition(",")
    try:
        aspect_range = (float(lo), float(hi or lo))
    except ValueError:
        raise ValueError(f"--aspect-range must be min,max numbers, got {args.aspect_range!r}") from None
    cfg = SynthConfig(
        width=w,
        height=h,
        random_aspect=bool(args.random_aspect),
        aspect_range=aspect_range,
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
    if not MIN_ASPECT <= cfg.aspect_range[0] <= cfg.aspect_range[1] <= MAX_ASPECT:
        raise ValueError(f"--aspect-range must be min,max with {MIN_ASPECT:g} <= min <= max <= {MAX_ASPECT:g}")
    if cfg.grid < 0 or (cfg.grid and cfg.grid * cfg.grid < cfg.max_objects):
        raise ValueError("--grid N needs N >= 0 and N * N >= --max-objects")
    if cfg.grid and min(w, h) < 8 * cfg.grid:
        raise ValueError(f"--grid {cfg.grid} leaves cells under 8 px in a {w}x{h} image")
    if problem := crowding_problem(cfg):
        raise ValueError(problem)
    return cfg


PACKING = 0.5  # share of an image that objects placed at random, apart, can cover (random packing saturates near it)


def crowding_problem(cfg: SynthConfig) -> str | None:
    """Why ``--min-objects`` objects of the sizes asked for (their mean side) cannot be placed apart in an image at
    random, or None."""
    if cfg.grid or cfg.max_overlap > 0:
        return None
    mean = sum(sum(SIZES[s]) / 2 for s in cfg.sizes) / len(cfg.sizes)
    side = max(6, round(min(cfg.width, cfg.height) * mean)) + cfg.min_gap
    fit = int(PACKING * cfg.width * cfg.height) // (side * side)
    if cfg.min_objects > fit:
        return (f"--min-objects {cfg.min_objects}: that many objects do not fit a {cfg.width}x{cfg.height} image "
                f"(objects {side - cfg.min_gap} px wide on average, {cfg.min_gap} px apart: about {fit}); lower "
                "--min-objects, raise --image-size, or use --grid")
    return None


def split_counts(num: int, splits: str) -> dict[str, int]:
    """``--num`` spread over splits by fraction; the first split takes the rounding remainder."""
    fr = parse_weights(splits, ("train", "val", "test"), "split")
    total = sum(fr.values())
    names = list(fr)
    counts = {n: int(round(num * fr[n] / total)) for n in names[1:]}
    counts = {names[0]: max(0, num - sum(counts.values())), **counts}
    return {n: counts[n] for n in names}

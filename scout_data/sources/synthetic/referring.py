"""What a noun phrase refers to: descriptions, relations, superlatives, resolved against a scene."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from scout_data.sources.synthetic.scenes import Obj, Scene
from scout_data.sources.synthetic.world import REL_WORDS, plural


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

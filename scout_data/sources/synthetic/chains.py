"""The chain steps of a query: worded (``full``), one located object per step (``terse``), or the expression's
sub-questions ending in the step that decides (``decide``, the grammar of :mod:`scout_data.chain`)."""

from __future__ import annotations

import random

from scout_data.chain import decide, locate, pick, reference
from scout_data.schema import BOX_SLOT, Step
from scout_data.sources.synthetic.referring import Desc, Query, ref_text, unique_desc
from scout_data.sources.synthetic.scenes import Scene
from scout_data.sources.synthetic.world import REL_WORDS
from scout_data.writer import item_list, phrase


def _same_category(scene: Scene, i: int) -> list[int]:
    return [j for j, o in enumerate(scene.objects) if o.shape == scene.objects[i].shape]


def _candidate_step(rng: random.Random, scene: Scene, idx: list[int]) -> Step:
    objs = scene.objects
    idx = sorted(idx, key=lambda j: (objs[j].cx, objs[j].cy))
    key = "candidates_one" if len(idx) == 1 else "candidates"
    return Step(phrase(rng, key, items=item_list([objs[j].words() for j in idx])), [objs[j].box for j in idx])



def object_name(scene: Scene, j: int, rng: random.Random) -> str:
    """How a terse step and a region caption name object ``j``: ``the red circle``, the shortest description
    that picks it alone (as a one-shot region prompt names it), else all its attributes."""
    o = scene.objects[j]
    return f"the {(unique_desc(scene, j, rng) or Desc(o.shape, o.colour, o.size)).words()}"


def _located(scene: Scene, idx: list[int], rng: random.Random) -> list[Step]:
    """Terse steps: each object, left to right, named by :func:`object_name`, with its box."""
    objs = scene.objects
    return [Step(f"{object_name(scene, j, rng)} {BOX_SLOT}", [objs[j].box])
            for j in sorted(idx, key=lambda j: (objs[j].cx, objs[j].cy))]


def left_to_right(scene: Scene, idx: list[int]) -> list[int]:
    objs = scene.objects
    return sorted(idx, key=lambda j: (objs[j].cx, objs[j].cy))


def named(scene: Scene, desc: Desc, idx: list[int]) -> Step:
    """A ``decide`` step naming objects in the expression's words: ``the triangle <box>`` for one,
    ``the triangles <box>, <box>`` for several, left to right."""
    boxes = [scene.objects[j].box for j in left_to_right(scene, idx)]
    return locate(f"the {desc.words()}", f"the {desc.plural()}", boxes)


def _category(desc: Desc) -> Desc:
    """The candidates' phrase of an attribute expression: its noun alone (``circle``; ``object`` without one)."""
    return Desc(shape=desc.shape)


def _decided_refexp(scene: Scene, q: Query, anchor_desc: Desc | None, target: int) -> list[Step]:
    """A ``decide`` chain (:mod:`scout_data.chain`). Relation: the candidates in the expression's words, the
    reference object, then the pick. Superlative: the candidates, then the pick. Attribute: the objects of its noun,
    then the pick (a single step when the noun alone picks it)."""
    objs = scene.objects
    box = objs[target].box
    if q.relation and q.anchor is not None and anchor_desc is not None:
        return [named(scene, q.desc, _refexp_candidates(scene, q, target)), reference(objs[q.anchor].box),
                pick([box])]
    if q.superlative:
        return [named(scene, q.desc, _refexp_candidates(scene, q, target)), pick([box])]
    noun = _category(q.desc)
    cands = [j for j, o in enumerate(objs) if noun.matches(o)]
    if cands == [target]:
        return [named(scene, q.desc, [target])]
    return [named(scene, noun, cands), pick([box])]


def decided_group(scene: Scene, d: Desc, targets: list[int]) -> list[Step]:
    """A ``decide`` chain of find-all and count: the objects of the description's noun, then its other words pick
    (one step when the noun is all it says)."""
    objs = scene.objects
    noun = _category(d)
    cands = [j for j, o in enumerate(objs) if noun.matches(o)]
    if sorted(cands) == sorted(targets):
        return [named(scene, d, targets)]
    return [named(scene, noun, cands), decide(f"the {d.plural() if len(targets) > 1 else d.words()}",
                                                [objs[j].box for j in left_to_right(scene, targets)])]


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
    rng: random.Random, scene: Scene, q: Query, anchor_desc: Desc | None, target: int, style: str = "full"
) -> list[Step]:
    """The chain of a referring expression in ``style``. Terse: the anchor (relations), then every candidate,
    each located; the answer line then picks the target. Decide: :func:`_decided_refexp`."""
    if style == "decide":
        return _decided_refexp(scene, q, anchor_desc, target)
    objs = scene.objects
    box = objs[target].box
    cands = _refexp_candidates(scene, q, target)
    if style == "terse":
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

"""Queries of every kind about a scene, with their chain, answer and difficulty."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from scout_data.boxes import Box, box_problem_px
from scout_data.schema import BOX_SLOT, Step
from scout_data.sources.synthetic.chains import (
    _candidate_step,
    _located,
    _refexp_steps,
    _same_category,
    decided_group,
    object_name,
)
from scout_data.sources.synthetic.config import SynthConfig
from scout_data.sources.synthetic.referring import Desc, Query, _relation_holds, ref_text, resolve, unique_desc
from scout_data.sources.synthetic.scenes import Scene
from scout_data.sources.synthetic.world import REL_WORDS, SUPERLATIVES
from scout_data.writer import item_list, phrase, slots

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
TEMPLATES = (REFEXP_QUERIES, FIND_ALL_QUERIES, COUNT_QUERIES, CAPTION_QUERIES, CAPTION_ANSWERS, CAPTION_QA_ANSWERS)


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
    query_boxes: list[Box] = field(default_factory=list)  # what the query's ``<box>`` slots show
    question_type: str = ""  # an understanding question's type (one of QA_TYPES)
    expression_type: str = ""  # a referring expression's type (one of REFEXP_TYPES)


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
        return Built("region", ref, [], targets, difficulty=difficulty, expression_type=t)
    query = rng.choice(REFEXP_QUERIES).format(ref=ref)
    return Built(
        "refexp", query, _refexp_steps(rng, scene, q, anchor_desc, targets[0], cfg.chain_style), targets,
        difficulty=difficulty,
        expression=ref,
        expression_type=t,
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


def _build_group(rng: random.Random, scene: Scene, kind: str, style: str = "full") -> Built | None:
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
    if style == "decide":
        steps = decided_group(scene, d, targets)
    elif style == "terse":
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


def _build_region_caption(rng: random.Random, scene: Scene) -> Built:
    """LLaVA-1.5's region captioning (RefCOCO REG): the prompt gives an object's box, the answer names it."""
    j = rng.randrange(len(scene.objects))
    return Built("region_caption", BOX_SLOT, [], [], answer_text=object_name(scene, j, rng), task="understanding",
                 query_boxes=[scene.objects[j].box])


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
            return Built("qa", query, [], [], answer_text=answer[0].upper() + answer[1:], task="understanding",
                         question_type=t)
        if query is not None and answer is not None:
            return Built("qa", f"{query} {SHORT_ANSWER}", [], [], answer_text=answer, task="understanding",
                         question_type=t)
    return None


def build_query(rng: random.Random, scene: Scene, kind: str, cfg: SynthConfig) -> Built | None:
    """A query of ``kind`` about ``scene`` and its chain, or None when the scene does not allow one."""
    if not scene.objects:
        return None
    if kind in ("refexp", "region"):
        return _build_refexp(rng, scene, cfg, region=kind == "region")
    if kind in ("find_all", "count"):
        return _build_group(rng, scene, kind, cfg.chain_style)
    if kind == "grounded_caption":
        return _build_caption(rng, scene)
    if kind == "region_caption":
        return _build_region_caption(rng, scene)
    return _build_qa(rng, scene, cfg)


def check_built(b: Built, scene: Scene) -> list[str]:
    """Why a built chain is wrong: a box outside the image or without area, answers not the referents."""
    problems = []
    boxes = [*b.query_boxes, *(bx for s in b.steps for bx in s.boxes_xyxy_px),
             *(scene.objects[j].box for j in b.targets)]
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

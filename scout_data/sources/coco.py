"""COCO instances -> SCOUT find-all, counting, superlative and relation samples.

Per image and category, using ``pycocotools``:

- ``find_all``: every instance of the category (several answer boxes), listed left to right;
- ``count``: the instances listed with boxes, then the number;
- ``superlative``: the largest / leftmost / rightmost instance, only when it wins clearly
  (largest: at least 1.5x the runner-up's box area; leftmost/rightmost: centres 5% of the image
  width apart);
- ``relation``: "the <cat> left of / right of / above / below the <anchor>", where the anchor is the
  only instance of its category, and exactly one instance of <cat> passes the relation while every
  other clearly fails it (margin 2% of the longer image side). The chain states the question,
  grounds the anchor, lists the candidates, then applies the relation.

Quirks: boxes are COCO ``[x, y, w, h]`` and become pixel ``xyxy``; boxes poking out by <= 1 px are
clamped. A category is used in an image only when every one of its annotations there is a usable
box, since counts, find-all lists and candidate lists must be complete. So a category with an
``iscrowd=1`` region, a zero-area or out-of-image box, or a box too thin for 2-decimal box text is
skipped for that image (one ``Skip`` naming image and category, plus one per bad annotation);
the image's other categories are still used. Images without annotations are skipped with a reason.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

from scout_data.boxes import Box
from scout_data.chain import locate, pick, reference
from scout_data.limits import PER_IMAGE
from scout_data.schema import Sample, Skip, Step
from scout_data.sources._annot import (
    area,
    center,
    coco_ann_box,
    image_problem,
    image_size_problem,
    load_coco,
    plural,
    rng_for,
)

TASKS = ("find_all", "count", "superlative", "relation")
SUPERLATIVES = ("largest", "leftmost", "rightmost")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
LARGEST_RATIO = 1.5
SIDE_GAP = 0.05
RELATION_MARGIN = 0.02

Instance = tuple[int, Box]  # (annotation id, pixel xyxy)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--instances", required=True, help="COCO instances JSON (e.g. instances_val2017.json)"
    )
    parser.add_argument("--images", default=None, help="image folder; when given, missing images are skipped")
    parser.add_argument("--split", default="train", help="split name written on every sample (default train)")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma list of sample kinds to make (default {','.join(TASKS)})",
    )
    parser.add_argument(
        "--max-instances",
        type=PER_IMAGE,
        default=10,
        help=f"use a category in an image only up to this many instances (default 10; {PER_IMAGE})",
    )
    parser.add_argument(
        "--max-superlatives", type=PER_IMAGE, default=2, help=f"superlative samples per image (default 2; {PER_IMAGE})"
    )
    parser.add_argument("--max-relations", type=PER_IMAGE, default=2,
                        help=f"relation samples per image (default 2; {PER_IMAGE})")


def parse_tasks(text: str | Sequence[str]) -> tuple[str, ...]:
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    items = [t for t in items if t]
    unknown = [t for t in items if t not in TASKS]
    if unknown or not items:
        raise ValueError(f"unknown COCO task(s) {unknown or items}; choose from {', '.join(TASKS)}")
    return tuple(items)


def iter_samples(args: argparse.Namespace) -> Iterator[Sample | Skip]:
    return convert_coco(
        args.instances,
        images_dir=args.images,
        split=args.split,
        tasks=parse_tasks(args.tasks),
        seed=getattr(args, "seed", 0) or 0,
        max_instances=args.max_instances,
        max_superlatives=args.max_superlatives,
        max_relations=args.max_relations,
    )


def convert_coco(
    instances: str | Path,
    images_dir: str | Path | None = None,
    split: str = "train",
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
    max_instances: int = 10,
    max_superlatives: int = 2,
    max_relations: int = 2,
) -> Iterator[Sample | Skip]:
    """SCOUT samples (and skips with reasons) from a COCO instances JSON file.

    The file is read (and a missing or malformed one raises) before the iterator is returned.
    """
    tasks = parse_tasks(tasks)
    coco, bad_anns = load_coco(instances)
    return _iter_coco(
        coco,
        bad_anns,
        Path(instances).name,
        images_dir,
        split,
        tasks,
        seed,
        max_instances,
        max_superlatives,
        max_relations,
    )


def _iter_coco(
    coco,
    bad_anns: list[Skip],
    fname: str,
    images_dir,
    split: str,
    tasks: Sequence[str],
    seed: int,
    max_instances: int,
    max_superlatives: int,
    max_relations: int,
) -> Iterator[Sample | Skip]:
    yield from bad_anns
    for ann in coco.dataset["annotations"]:
        if ann["image_id"] not in coco.imgs:
            yield Skip(f"{fname}:ann {ann['id']}", f"image_id {ann['image_id']!r} is not in 'images'")

    for image_id in sorted(coco.imgs, key=_sort_key):
        yield from _image_samples(
            coco,
            fname,
            image_id,
            images_dir,
            split,
            tasks,
            seed,
            max_instances,
            max_superlatives,
            max_relations,
        )


def _sort_key(v: object) -> tuple[int, str]:
    return (0, f"{v:020d}") if isinstance(v, int) else (1, str(v))


def _image_samples(
    coco,
    fname: str,
    image_id,
    images_dir,
    split: str,
    tasks: Sequence[str],
    seed: int,
    max_instances: int,
    max_superlatives: int,
    max_relations: int,
) -> Iterator[Sample | Skip]:
    img = coco.imgs[image_id]
    ref = f"{fname}:image {image_id}"
    anns = coco.imgToAnns.get(image_id, [])
    if not anns:
        yield Skip(ref, "image has no annotations")
        return
    problem = image_size_problem(img.get("width"), img.get("height"))
    file_name = img.get("file_name")
    if problem is None and not isinstance(file_name, str):
        problem = f"file_name {file_name!r} is not a string"
    if problem is None:
        problem = image_problem(images_dir, file_name)
    if problem is not None:
        yield Skip(ref, problem)
        return
    width, height = int(img["width"]), int(img["height"])

    good: dict[int, list[Instance]] = defaultdict(list)
    excluded: dict[int, list[str]] = defaultdict(list)
    for ann in anns:
        cid = ann.get("category_id")
        if cid not in coco.cats:
            yield Skip(f"{fname}:ann {ann['id']}", f"category_id {cid!r} is not in 'categories'")
            continue
        if ann.get("iscrowd", 0):
            excluded[cid].append(f"an iscrowd=1 region (ann {ann['id']}) means not every instance is boxed")
            continue
        box, why = coco_ann_box(ann, width, height)
        if box is None:
            yield Skip(f"{fname}:ann {ann['id']}", str(why))
            excluded[cid].append(f"ann {ann['id']} has an unusable box")
            continue
        good[cid].append((ann["id"], box))

    usable: dict[int, list[Instance]] = {}
    for cid in sorted(set(good) | set(excluded)):
        name = coco.cats[cid].get("name", str(cid))
        if excluded.get(cid):
            yield Skip(
                f"{ref} category {name}", "category not used in this image: " + "; ".join(excluded[cid])
            )
        elif len(good[cid]) > max_instances:
            yield Skip(
                f"{ref} category {name}",
                f"{len(good[cid])} instances is more than --max-instances {max_instances}",
            )
        else:
            usable[cid] = sorted(good[cid], key=lambda inst: (inst[1][0], inst[1][1], inst[0]))

    base = {"image": file_name, "width": width, "height": height, "split": split, "source": "coco"}
    rng = rng_for(seed, f"coco:{image_id}")
    for cid, insts in usable.items():
        name = coco.cats[cid].get("name", str(cid))
        ids = {"image_id": image_id, "category_id": cid, "ann_ids": [a for a, _ in insts]}
        if "find_all" in tasks:
            yield _find_all(name, insts, rng, id=f"coco_{image_id}_find_{cid}", source_ids=ids, **base)
        if "count" in tasks:
            yield _count(name, insts, rng, id=f"coco_{image_id}_count_{cid}", source_ids=ids, **base)

    if "superlative" in tasks and max_superlatives > 0:
        options = [
            (cid, sup, win)
            for cid, insts in usable.items()
            for sup in SUPERLATIVES
            if (win := _superlative_winner(sup, insts, width)) is not None
        ]
        for cid, sup, win in _pick(rng, options, max_superlatives):
            name, insts = coco.cats[cid].get("name", str(cid)), usable[cid]
            ids = {
                "image_id": image_id,
                "category_id": cid,
                "ann_ids": [a for a, _ in insts],
                "answer_ann_id": win[0],
            }
            yield _superlative(
                name, sup, insts, win, rng, id=f"coco_{image_id}_{sup}_{cid}", source_ids=ids, **base
            )

    if "relation" in tasks and max_relations > 0:
        anchors = {cid: insts[0] for cid, insts in usable.items() if len(insts) == 1}
        margin = RELATION_MARGIN * max(width, height)
        options = []
        for tcid, insts in usable.items():
            if len(insts) < 2:
                continue
            for acid, anchor in anchors.items():
                for rel in RELATIONS:
                    win = _relation_winner(rel, insts, anchor[1], margin)
                    if win is not None:
                        options.append((tcid, rel, acid, win))
        for tcid, rel, acid, win in _pick(rng, options, max_relations):
            tname, aname = coco.cats[tcid].get("name", str(tcid)), coco.cats[acid].get("name", str(acid))
            ids = {
                "image_id": image_id,
                "category_id": tcid,
                "anchor_category_id": acid,
                "relation": rel,
                "ann_ids": [a for a, _ in usable[tcid]],
                "anchor_ann_id": anchors[acid][0],
                "answer_ann_id": win[0],
            }
            yield _relation(
                tname,
                aname,
                rel,
                usable[tcid],
                anchors[acid],
                win,
                rng,
                id=f"coco_{image_id}_rel_{tcid}_{rel}_{acid}",
                source_ids=ids,
                **base,
            )


def _pick(rng, options: list, k: int) -> list:
    return options if len(options) <= k else [options[i] for i in sorted(rng.sample(range(len(options)), k))]


def _boxes(insts: Sequence[Instance]) -> list[Box]:
    return [b for _, b in insts]


def _named(name: str, insts: Sequence[Instance]) -> Step:
    """SCOUT's step that names objects in the query's words (``the dog``, ``the dogs``), with their boxes."""
    return locate(f"the {name}", f"the {plural(name)}", _boxes(insts))


def _find_all(name: str, insts: list[Instance], rng, **kw) -> Sample:
    pl = plural(name)
    query = rng.choice(
        [
            f"Find every {name} in the image.",
            f"Where are all the {pl}?",
            f"Locate each {name} in the picture.",
        ]
    )
    steps = [_named(name, insts)]
    return Sample(query=query, kind="find_all", steps=steps, answer_boxes_xyxy_px=_boxes(insts), **kw)


def _count(name: str, insts: list[Instance], rng, **kw) -> Sample:
    n, pl = len(insts), plural(name)
    query = rng.choice(
        [
            f"How many {pl} are there in the image?",
            f"Count the {pl} in the picture.",
            f"How many {pl} can you see?",
        ]
    )
    steps = [_named(name, insts)]
    return Sample(
        query=query, kind="count", steps=steps, answer_boxes_xyxy_px=_boxes(insts), answer_text=str(n), **kw
    )


def _superlative_winner(sup: str, insts: Sequence[Instance], width: int) -> Instance | None:
    if len(insts) < 2:
        return None
    if sup == "largest":
        ranked = sorted(insts, key=lambda i: -area(i[1]))
        return ranked[0] if area(ranked[0][1]) >= LARGEST_RATIO * area(ranked[1][1]) else None
    sign = 1 if sup == "leftmost" else -1
    ranked = sorted(insts, key=lambda i: sign * center(i[1])[0])
    gap = abs(center(ranked[0][1])[0] - center(ranked[1][1])[0])
    return ranked[0] if gap >= SIDE_GAP * width else None


def _superlative(name: str, sup: str, insts: list[Instance], win: Instance, rng, **kw) -> Sample:
    query = rng.choice(
        [f"Where is the {sup} {name}?", f"Find the {sup} {name} in the image.", f"Locate the {sup} {name}."]
    )
    steps = [_named(name, insts), pick([win[1]])]
    return Sample(
        query=query, kind="refexp", steps=steps, answer_boxes_xyxy_px=[win[1]], difficulty="hard", **kw
    )


def _relation_score(rel: str, box: Box, anchor: Box) -> float:
    cx, cy = center(box)
    return {
        "left": anchor[0] - cx,
        "right": cx - anchor[2],
        "above": anchor[1] - cy,
        "below": cy - anchor[3],
    }[rel]


def _relation_winner(rel: str, insts: Sequence[Instance], anchor: Box, margin: float) -> Instance | None:
    scores = [(_relation_score(rel, b, anchor), inst) for inst in insts for b in [inst[1]]]
    passing = [inst for s, inst in scores if s > margin]
    failing = [inst for s, inst in scores if s < -margin]
    if len(passing) == 1 and len(failing) == len(insts) - 1:
        return passing[0]
    return None


def _relation(
    tname: str, aname: str, rel: str, insts: list[Instance], anchor: Instance, win: Instance, rng, **kw
) -> Sample:
    rel_text = RELATIONS[rel]
    query = rng.choice(
        [
            f"Where is the {tname} {rel_text} the {aname}?",
            f"Find the {tname} {rel_text} the {aname}.",
            f"Locate the {tname} that is {rel_text} the {aname}.",
        ]
    )
    steps = [_named(tname, insts), reference(anchor[1]), pick([win[1]])]
    return Sample(
        query=query, kind="refexp", steps=steps, answer_boxes_xyxy_px=[win[1]], difficulty="hard", **kw
    )

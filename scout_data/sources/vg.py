"""Visual Genome -> SCOUT region, find-all and counting samples.

Inputs: ``region_descriptions.json`` (``[{id, regions: [{region_id, image_id, phrase, x, y, width,
height}]}]``) and/or ``objects.json`` (``[{image_id, objects: [{object_id, x, y, w, h, names}]}]``),
with ``image_data.json`` (``[{image_id, width, height, url}]``) for image sizes and paths (the URL's
last two parts, e.g. ``VG_100K_2/1.jpg``; with ``--images``, a flat ``<image_id>.jpg`` is found too).

- Regions: one sample per region, ``region`` (LLaVA-1.5's one-shot "bounding box of the region this
  sentence describes") or, with ``--region-kind refexp``, a short chain. Regions repeating the same
  phrase in an image with a box of IoU >= 0.9 are duplicates (skipped, naming the kept region); the
  same phrase with clearly different boxes is ambiguous and every region of it is skipped.
- Objects: per image and object name (the first of ``names``, lower-cased), ``find_all`` and
  ``count`` samples. Objects of one name overlapping at IoU >= 0.8 are treated as one object
  annotated twice (the later is skipped with a reason). A name with an unusable box, or more than
  ``--max-instances`` objects, is not used in that image. VG object annotations are not exhaustive,
  so VG counts are those of the annotations.
- Boxes (``x, y, w, h``) poking out of the image by <= 1 px (including slightly negative corners) are
  clamped; anything further is skipped with a reason.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from scout_data.boxes import Box, coco_xywh_to_xyxy, iou
from scout_data.chain import locate, pick
from scout_data.limits import PER_IMAGE
from scout_data.schema import Sample, Skip
from scout_data.sources._annot import (
    InputFileError,
    check_box,
    image_size_problem,
    is_id,
    is_number,
    load_json,
    looks_plural,
    plural,
    quote,
    rng_for,
)

REGION_DUP_IOU = 0.9
OBJECT_DUP_IOU = 0.8
OBJECT_TASKS = ("find_all", "count")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--regions", default=None, help="region_descriptions.json")
    parser.add_argument("--objects", default=None, help="objects.json")
    parser.add_argument("--image-data", required=True, help="image_data.json (image sizes and URLs)")
    parser.add_argument("--images", default=None, help="VG image folder; missing images are skipped")
    parser.add_argument("--split", default="train", help="split name written on every sample (default train)")
    parser.add_argument(
        "--region-kind",
        default="region",
        choices=("region", "refexp"),
        help="sample kind for region descriptions (default region)",
    )
    parser.add_argument(
        "--object-tasks",
        default=",".join(OBJECT_TASKS),
        help="comma list of find_all,count for objects.json (default both)",
    )
    parser.add_argument(
        "--max-instances",
        type=PER_IMAGE,
        default=10,
        help=f"use an object name in an image only up to this many objects (default 10; {PER_IMAGE})",
    )


def iter_samples(args: argparse.Namespace) -> Iterator[Sample | Skip]:
    return convert_vg(
        image_data=args.image_data,
        regions=args.regions,
        objects=args.objects,
        images_dir=args.images,
        split=args.split,
        region_kind=args.region_kind,
        object_tasks=[t.strip() for t in args.object_tasks.split(",") if t.strip()],
        seed=getattr(args, "seed", 0) or 0,
        max_instances=args.max_instances,
    )


class ImageIndex:
    """``image_data.json``: image id -> (relative path, width, height) or a reason it is unusable."""

    def __init__(self, path: str | Path, images_dir: str | Path | None = None) -> None:
        data = load_json(path, "Visual Genome image_data")
        if not isinstance(data, list):
            raise InputFileError(f"Visual Genome image_data file {path} must hold a JSON list")
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self.entries: dict[Any, dict] = {}
        for rec in data:
            if isinstance(rec, dict) and is_id(_image_id(rec)):
                self.entries[_image_id(rec)] = rec
        self._cache: dict[Any, tuple[str, int, int] | str] = {}

    def lookup(self, image_id: Any) -> tuple[str, int, int] | str:
        if not is_id(image_id):
            return f"image id {image_id!r} is not an id"
        if image_id not in self._cache:
            self._cache[image_id] = self._lookup(image_id)
        return self._cache[image_id]

    def _lookup(self, image_id: Any) -> tuple[str, int, int] | str:
        rec = self.entries.get(image_id)
        if rec is None:
            return f"image {image_id} is not in image_data.json"
        problem = image_size_problem(rec.get("width"), rec.get("height"))
        if problem:
            return problem
        url = rec.get("url")
        parts = url.rstrip("/").split("/")[-2:] if isinstance(url, str) and url.strip() else []
        rel = "/".join(parts) if len(parts) == 2 else f"{image_id}.jpg"
        if self.images_dir is not None:
            options = [rel, rel.split("/")[-1], f"{image_id}.jpg"]
            found = next((o for o in options if (self.images_dir / o).is_file()), None)
            if found is None:
                return f"image file {rel} not found in {self.images_dir}"
            rel = found
        return rel, int(rec["width"]), int(rec["height"])


def _image_id(rec: dict) -> Any:
    return rec.get("image_id", rec.get("id"))


def _xywh_box(rec: dict, keys: Sequence[str], width: int, height: int) -> tuple[Box | None, str | None]:
    vals = [rec.get(k) for k in keys]
    if not all(is_number(v) for v in vals):
        return None, f"box fields {dict(zip(keys, vals, strict=True))} are not 4 numbers"
    return check_box(coco_xywh_to_xyxy(vals), width, height)  # type: ignore[arg-type]


def _norm_text(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def convert_vg(
    image_data: str | Path,
    regions: str | Path | None = None,
    objects: str | Path | None = None,
    images_dir: str | Path | None = None,
    split: str = "train",
    region_kind: str = "region",
    object_tasks: Sequence[str] = OBJECT_TASKS,
    seed: int = 0,
    max_instances: int = 10,
) -> Iterator[Sample | Skip]:
    """Region samples from ``regions``, then object samples from ``objects`` (at least one is needed).

    ``image_data`` is read, and the other files checked to exist, before the iterator is returned; the
    large region/object files are read one after the other while iterating.
    """
    if regions is None and objects is None:
        raise ValueError("Visual Genome needs --regions and/or --objects")
    unknown = [t for t in object_tasks if t not in OBJECT_TASKS]
    if unknown or region_kind not in ("region", "refexp"):
        raise ValueError(
            f"unknown VG task(s) {unknown or region_kind}; objects: {OBJECT_TASKS}, regions: region/refexp"
        )
    for path, what in ((regions, "region_descriptions"), (objects, "objects")):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"Visual Genome {what} file not found: {path}")
    index = ImageIndex(image_data, images_dir)
    return _iter_vg(index, regions, objects, split, region_kind, object_tasks, seed, max_instances)


def _iter_vg(
    index: ImageIndex,
    regions,
    objects,
    split: str,
    region_kind: str,
    object_tasks: Sequence[str],
    seed: int,
    max_instances: int,
) -> Iterator[Sample | Skip]:
    if regions is not None:
        yield from _region_samples(regions, index, split, region_kind, seed)
    if objects is not None:
        yield from _object_samples(objects, index, split, object_tasks, seed, max_instances)


def _load_list(path: str | Path, what: str) -> list:
    data = load_json(path, what)
    if not isinstance(data, list):
        raise InputFileError(f"{what} file {path} must hold a JSON list, got {type(data).__name__}")
    return data


def _region_samples(path, index: ImageIndex, split: str, kind: str, seed: int) -> Iterator[Sample | Skip]:
    fname = Path(path).name
    for i, entry in enumerate(_load_list(path, "Visual Genome region_descriptions")):
        if not isinstance(entry, dict) or not isinstance(entry.get("regions"), list):
            yield Skip(f"{fname}:#{i}", "entry is not an object with a 'regions' list")
            continue
        image_id = _image_id(entry)
        looked = index.lookup(image_id)
        if isinstance(looked, str):
            yield Skip(f"{fname}:image {image_id}", f"{looked} ({len(entry['regions'])} region(s) lost)")
            continue
        rel, width, height = looked
        kept: list[tuple[Any, str, Box]] = []
        for j, reg in enumerate(entry["regions"]):
            rid = reg.get("region_id", f"{image_id}#{j}") if isinstance(reg, dict) else f"{image_id}#{j}"
            rref = f"{fname}:region {rid}"
            if not isinstance(reg, dict):
                yield Skip(rref, "region is not an object")
                continue
            text = reg.get("phrase")
            if not isinstance(text, str) or not text.strip():
                yield Skip(rref, "region has no phrase")
                continue
            box, why = _xywh_box(reg, ("x", "y", "width", "height"), width, height)
            if box is None:
                yield Skip(rref, str(why))
                continue
            kept.append((rid, " ".join(text.split()), box))

        groups: dict[str, list[tuple[Any, str, Box]]] = {}
        for item in kept:
            groups.setdefault(_norm_text(item[1]), []).append(item)
        for items in groups.values():
            first = items[0]
            dups = [it for it in items[1:] if iou(it[2], first[2]) >= REGION_DUP_IOU]
            others = [it for it in items[1:] if iou(it[2], first[2]) < REGION_DUP_IOU]
            for it in dups:
                yield Skip(f"{fname}:region {it[0]}", f"duplicate of region {first[0]} (same phrase and box)")
            if others:
                for it in [first, *others]:
                    peers = [o[0] for o in [first, *others] if o is not it]
                    yield Skip(
                        f"{fname}:region {it[0]}",
                        f"ambiguous phrase: region(s) {peers} have the same phrase with other boxes",
                    )
                continue
            rid, text, box = first
            sid = f"vg_region_{rid}"
            base = {
                "id": sid,
                "image": rel,
                "width": width,
                "height": height,
                "split": split,
                "source": "vg",
                "source_ids": {"image_id": image_id, "region_id": rid},
                "answer_boxes_xyxy_px": [box],
            }
            if kind == "region":
                yield Sample(query=text, kind="region", **base)
            else:
                rng = rng_for(seed, sid)
                q = quote(text)
                steps = [pick([box])]  # VG annotates the region alone: no candidates, the pick is the chain
                yield Sample(
                    query=rng.choice([f"Where is {q}?", f"Find the region described as {q}."]),
                    kind="refexp",
                    expression=text,
                    steps=steps,
                    **base,
                )


def _object_samples(
    path, index: ImageIndex, split: str, tasks: Sequence[str], seed: int, max_instances: int
) -> Iterator[Sample | Skip]:
    fname = Path(path).name
    for i, entry in enumerate(_load_list(path, "Visual Genome objects")):
        if not isinstance(entry, dict) or not isinstance(entry.get("objects"), list):
            yield Skip(f"{fname}:#{i}", "entry is not an object with an 'objects' list")
            continue
        image_id = _image_id(entry)
        looked = index.lookup(image_id)
        if isinstance(looked, str):
            yield Skip(f"{fname}:image {image_id}", f"{looked} ({len(entry['objects'])} object(s) lost)")
            continue
        rel, width, height = looked
        by_name: dict[str, list[tuple[Any, Box]]] = {}
        broken: dict[str, list[Any]] = {}
        for j, obj in enumerate(entry["objects"]):
            oid = obj.get("object_id", f"{image_id}#{j}") if isinstance(obj, dict) else f"{image_id}#{j}"
            oref = f"{fname}:object {oid}"
            names = obj.get("names") if isinstance(obj, dict) else None
            if (
                not isinstance(names, list)
                or not names
                or not isinstance(names[0], str)
                or not names[0].strip()
            ):
                yield Skip(oref, "object has no name")
                continue
            name = " ".join(names[0].lower().split())
            box, why = _xywh_box(obj, ("x", "y", "w", "h"), width, height)
            if box is None:
                yield Skip(oref, str(why))
                broken.setdefault(name, []).append(oid)
                continue
            same = by_name.setdefault(name, [])
            twin = next((o for o in same if iou(o[1], box) >= OBJECT_DUP_IOU), None)
            if twin is not None:
                yield Skip(oref, f"duplicate of object {twin[0]} (same name, IoU {iou(twin[1], box):.2f})")
                continue
            same.append((oid, box))

        used: set[str] = set()
        for name in sorted(by_name):
            insts = sorted(by_name[name], key=lambda o: (o[1][0], o[1][1]))
            nref = f"{fname}:image {image_id} name {name}"
            if name in broken:
                yield Skip(nref, f"name not used in this image: object(s) {broken[name]} have unusable boxes")
                continue
            if looks_plural(name):
                yield Skip(nref, "name not used: a plural name may box a group, so it cannot be counted")
                continue
            if len(insts) > max_instances:
                yield Skip(nref, f"{len(insts)} objects is more than --max-instances {max_instances}")
                continue
            boxes = [b for _, b in insts]
            pl, n = plural(name), len(insts)
            base = {
                "image": rel,
                "width": width,
                "height": height,
                "split": split,
                "source": "vg",
                "source_ids": {"image_id": image_id, "name": name, "object_ids": [o for o, _ in insts]},
                "answer_boxes_xyxy_px": boxes,
            }
            step = locate(f"the {name}", f"the {pl}", boxes)
            slug = re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "object"
            while slug in used:
                slug += "_"
            used.add(slug)
            if "find_all" in tasks:
                steps = [step]
                yield Sample(
                    id=f"vg_{image_id}_find_{slug}",
                    query=f"Find every {name} in the image.",
                    kind="find_all",
                    steps=steps,
                    **base,
                )
            if "count" in tasks:
                steps = [step]
                yield Sample(
                    id=f"vg_{image_id}_count_{slug}",
                    query=f"How many {pl} are there in the image?",
                    kind="count",
                    steps=steps,
                    answer_text=str(n),
                    **base,
                )

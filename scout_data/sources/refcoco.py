"""RefCOCO / RefCOCO+ / RefCOCOg -> SCOUT referring-expression samples.

Inputs are the files of the ``refer`` toolkit: ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p``
(a pickled list of refs: ``ref_id, ann_id, image_id, split, sentences: [{sent, raw, tokens, sent_id}],
category_id, file_name``) and the COCO ``instances.json`` beside them. Every sentence of a ref becomes
one ``refexp`` sample, id ``<dataset>_<ref_id>_<sent_id>`` (dataset ``refcoco``, ``refcocop`` for
RefCOCO+, ``refcocog``), keeping the official split name (train, val, testA, testB, test).

The chain says what is asked, lists the candidates (the boxed, non-crowd instances of the referent's
category in the image, at most ``--max-candidates``, the referent always among them), then names the
referent; the answer is the referent's box. ``--kinds refexp,region`` also writes each sentence as LLaVA-1.5's
one-shot REC record (``region``, id ``..._rec``: the expression in its REC prompt, the box as the whole answer).

The ``.p`` files are pickles, so they are read with ``SafeUnpickler``: only plain containers and
scalars load; any global (class, function) is refused with an error naming the file and the global.
Python-2 pickles whose byte strings are not ASCII are read again with ``encoding='latin1'``.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from scout_data.boxes import Box
from scout_data.chain import locate, pick
from scout_data.inputs import InputError, read_input
from scout_data.limits import MAX_EXPRESSION_CHARS, PER_IMAGE
from scout_data.schema import Sample, Skip, Step
from scout_data.sources._annot import (
    InputFileError,
    area,
    coco_ann_box,
    image_problem,
    image_size_problem,
    is_id,
    load_coco,
    plural,
    quote,
    rng_for,
)

DATASETS = {"refcoco": "refcoco", "refcoco+": "refcocop", "refcocop": "refcocop", "refcocog": "refcocog"}
_FILE_SUFFIX_RE = re.compile(r"_\d+(\.[A-Za-z0-9]+)$")


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global (class or function); refused."""


class SafeUnpickler(pickle.Unpickler):
    """Loads only plain containers and scalars: every global lookup is refused."""

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<pickle>", **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self.source}: refusing to load global {module}.{name}; "
            "only plain containers and scalars are allowed in refs pickles"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refusing persistent id {pid!r} in refs pickle")


def load_refs_pickle(path: str | Path) -> list:
    """Load a ``refs(*).p`` file with ``SafeUnpickler`` (latin1 fallback for Python-2 byte strings)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"refs pickle not found: {p}")
    try:
        data = read_input(p, what="refs pickle")
    except InputError as e:
        raise InputFileError(str(e)) from None
    try:
        try:
            refs = SafeUnpickler(io.BytesIO(data), source=str(p)).load()
        except UnicodeDecodeError:
            refs = SafeUnpickler(io.BytesIO(data), source=str(p), encoding="latin1").load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or corrupt pickles raise many types
        raise InputFileError(f"refs pickle {p} could not be read: {type(e).__name__}: {e}") from e
    if not isinstance(refs, list):
        raise InputFileError(f"refs pickle {p} must hold a list of refs, got {type(refs).__name__}")
    text = sum(len(t) for ref in refs if isinstance(ref, dict) and isinstance(ref.get("sentences"), list)
               for sent in ref["sentences"] if isinstance(sent, dict)
               for t in (sent.get("sent"), sent.get("raw")) if isinstance(t, str))
    if text > 2 * len(data):  # a pickle stores each sentence at least once; more means one object shared many times
        raise InputFileError(f"refs pickle {p}: its sentences hold {text} characters, more than its {len(data)} bytes "
                             "store (objects shared many times); the converter would copy each")
    return refs


def dataset_name(refs_path: str | Path, dataset: str | None = None) -> str:
    """Sample-id prefix: explicit ``dataset``, else the refer folder name, else the pickle's split-by."""
    if dataset:
        key = dataset.lower()
        if key not in DATASETS:
            raise ValueError(f"unknown RefCOCO dataset {dataset!r}; choose from {', '.join(DATASETS)}")
        return DATASETS[key]
    p = Path(refs_path)
    if p.parent.name.lower() in DATASETS:
        return DATASETS[p.parent.name.lower()]
    if "umd" in p.name or "google" in p.name:
        return "refcocog"
    return "refcoco"


def image_file_from_ref(file_name: str) -> str:
    """``COCO_train2014_000000581857_16.jpg`` -> ``COCO_train2014_000000581857.jpg``."""
    return _FILE_SUFFIX_RE.sub(r"\1", file_name)


KINDS = ("refexp", "region")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refs", required=True, help="refs(unc).p / refs(umd).p / refs(google).p")
    parser.add_argument("--instances", required=True, help="COCO instances.json shipped with the refs")
    parser.add_argument(
        "--images", default=None, help="COCO train2014 image folder; missing images are skipped"
    )
    parser.add_argument(
        "--splits",
        default=None,
        help="comma list of official splits to keep, e.g. val,testA,testB (default: all)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        choices=sorted(DATASETS),
        help="dataset name for ids/source_ids (default: from the refs folder name)",
    )
    parser.add_argument(
        "--max-candidates",
        type=PER_IMAGE,
        default=10,
        help=f"at most this many candidate boxes listed per chain (default 10; {PER_IMAGE})",
    )
    parser.add_argument(
        "--kinds",
        type=parse_kinds,
        default=("refexp",),
        help="the records each expression gives, comma-separated: refexp (a SCOUT step-by-step chain, the default), "
        "region (LLaVA-1.5's one-shot REC record: the expression, then its box), or both, as the paper's grounding "
        "expert learns RefCOCO",
    )


def parse_kinds(text: str) -> tuple[str, ...]:
    """``refexp,region`` -> ``("refexp", "region")``; an unknown or repeated kind is refused."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(KINDS)}, each once")
    return kinds


def iter_samples(args: argparse.Namespace) -> Iterator[Sample | Skip]:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    return convert_refcoco(
        args.refs,
        args.instances,
        images_dir=args.images,
        splits=splits,
        dataset=args.dataset,
        seed=getattr(args, "seed", 0) or 0,
        max_candidates=args.max_candidates,
        kinds=args.kinds,
    )


def convert_refcoco(
    refs_path: str | Path,
    instances: str | Path,
    images_dir: str | Path | None = None,
    splits: Sequence[str] | None = None,
    dataset: str | None = None,
    seed: int = 0,
    max_candidates: int = 10,
    kinds: Sequence[str] = ("refexp",),
) -> Iterator[Sample | Skip]:
    """One sample of each of ``kinds`` per (ref, sentence) (``refexp``: a step-by-step chain; ``region``: the
    one-shot REC record, id suffixed ``_rec``), and skips with reasons, in refs order.

    Both files are read (and a missing, malformed or unsafe one raises) before the iterator is returned.
    """
    name = dataset_name(refs_path, dataset)
    refs = load_refs_pickle(refs_path)
    coco, _ = load_coco(instances)  # a ref to a dropped annotation is skipped as "not in the instances file"
    keep = set(splits) if splits else None
    return _iter_refs(refs, coco, Path(refs_path).name, name, keep, images_dir, seed, max_candidates, tuple(kinds))


def _iter_refs(
    refs: list, coco, fname: str, name: str, keep: set[str] | None, images_dir, seed: int, max_candidates: int,
    kinds: tuple[str, ...],
) -> Iterator[Sample | Skip]:
    by_image_cat: dict[tuple[Any, Any], list[dict]] = defaultdict(list)
    for ann in coco.dataset["annotations"]:
        by_image_cat[(ann.get("image_id"), ann.get("category_id"))].append(ann)
    cand_cache: dict[tuple[Any, Any], tuple[list[tuple[int, Box]], int]] = {}

    for index, ref in enumerate(refs):
        ref_key = ref.get("ref_id", f"#{index}") if isinstance(ref, dict) else f"#{index}"
        rref = f"{fname}:ref {ref_key}"
        if not isinstance(ref, dict):
            yield Skip(rref, f"ref is a {type(ref).__name__}, not a dict")
            continue
        missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in ref]
        if missing:
            yield Skip(rref, f"ref lacks {', '.join(missing)}")
            continue
        if keep is not None and ref["split"] not in keep:
            continue
        yield from _ref_samples(
            ref, rref, coco, by_image_cat, cand_cache, name, images_dir, seed, max_candidates, kinds
        )


def decided_chain(category: str, candidates: list[Box], total: int, target: Box) -> list[Step]:
    """SCOUT's step grammar (:mod:`scout_data.chain`) as far as RefCOCO's annotations go: the objects of the
    referent's category (its candidates; the largest ones when there are more than the cap, and the step says how
    many of how many), then the pick. RefCOCO annotates no anchor, so no anchor step. With one
    object of its category, locating it is the chain."""
    if total == 1:
        return [locate(f"the {category}", "", [target])]
    many = plural(category)
    named = f"the {many}" if len(candidates) == total else f"{len(candidates)} of the {total} {many}"
    return [locate(named, named, candidates), pick([target])]


def _ref_samples(
    ref: dict,
    rref: str,
    coco,
    by_image_cat,
    cand_cache: dict,
    name: str,
    images_dir,
    seed: int,
    max_candidates: int,
    kinds: tuple[str, ...],
) -> Iterator[Sample | Skip]:
    sentences = ref["sentences"]
    if not isinstance(sentences, list) or not sentences:
        yield Skip(rref, "ref has no sentences")
        return
    if not (is_id(ref["ann_id"]) and is_id(ref["image_id"])):
        yield Skip(rref, f"ann_id {ref['ann_id']!r} / image_id {ref['image_id']!r} are not ids")
        return
    ann = coco.anns.get(ref["ann_id"])
    if ann is None:
        yield Skip(
            rref, f"ann_id {ref['ann_id']} is not in the instances file ({len(sentences)} sentence(s) lost)"
        )
        return
    image_id = ref["image_id"]
    if ann.get("image_id") != image_id:
        yield Skip(rref, f"ann_id {ref['ann_id']} belongs to image {ann.get('image_id')}, not {image_id}")
        return
    img = coco.imgs.get(image_id)
    if img is None:
        yield Skip(rref, f"image_id {image_id} is not in the instances file")
        return
    problem = image_size_problem(img.get("width"), img.get("height"))
    if problem:
        yield Skip(rref, problem)
        return
    width, height = int(img["width"]), int(img["height"])
    file_name = img.get("file_name") or image_file_from_ref(str(ref.get("file_name", "")))
    problem = image_problem(images_dir, file_name)
    if problem:
        yield Skip(rref, problem)
        return
    target, why = coco_ann_box(ann, width, height)
    if target is None:
        yield Skip(rref, f"referent ann {ann['id']}: {why}")
        return

    cid = ann.get("category_id")
    cat = coco.cats.get(cid, {}).get("name", "object")
    key = (image_id, cid)
    if key not in cand_cache:
        group = [o for o in by_image_cat.get(key, []) if not o.get("iscrowd", 0)]
        boxed = [(o["id"], b) for o in group for b in [coco_ann_box(o, width, height)[0]] if b is not None]
        cand_cache[key] = (boxed, len(group))
    boxed, total = cand_cache[key]
    total = total + (1 if ann.get("iscrowd", 0) else 0)
    candidates: list[tuple[int, Box]] = [(ann["id"], target), *[c for c in boxed if c[0] != ann["id"]]]
    if len(candidates) > max_candidates:
        rest = sorted(candidates[1:], key=lambda c: -area(c[1]))[: max(max_candidates - 1, 0)]
        candidates = [candidates[0], *rest]
    candidates.sort(key=lambda c: (c[1][0], c[1][1], c[0]))
    cand_boxes = [b for _, b in candidates]

    base_ids = {
        "dataset": name,
        "ref_id": ref["ref_id"],
        "ann_id": ann["id"],
        "image_id": image_id,
        "category_id": cid,
        "candidate_ann_ids": [a for a, _ in candidates],
    }
    for k, sent in enumerate(sentences):
        text = (sent.get("sent") or sent.get("raw")) if isinstance(sent, dict) else None
        sent_id = sent.get("sent_id", k) if isinstance(sent, dict) else k
        if not isinstance(text, str) or not text.strip():
            yield Skip(f"{rref} sent {sent_id}", "sentence has no text")
            continue
        if len(text) > MAX_EXPRESSION_CHARS:
            yield Skip(f"{rref} sent {sent_id}", f"sentence is {len(text)} characters; the limit is "
                                                 f"{MAX_EXPRESSION_CHARS}")
            continue
        sid = f"{name}_{ref['ref_id']}_{sent_id}"
        rng = rng_for(seed, sid)
        q = quote(text)
        query = rng.choice(
            [
                f"Where is {q}?",
                f"Find the region described as {q}.",
                f"Locate {q} in the image.",
                f"Give the box of {q}.",
            ]
        )
        steps = decided_chain(cat, cand_boxes, total, target)
        common = dict(image=file_name, width=width, height=height, expression=text.strip(),
                      answer_boxes_xyxy_px=[target], difficulty="simple" if total == 1 else "hard",
                      split=str(ref["split"]), source=name, source_ids=dict(base_ids, sent_id=sent_id))
        if "refexp" in kinds:
            yield Sample(id=sid, query=query, kind="refexp", steps=steps, **common)
        if "region" in kinds:
            yield Sample(id=f"{sid}_rec", query=text.strip(), kind="region", **common)

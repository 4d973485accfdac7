"""Flickr30k Entities -> SCOUT grounded captions.

Inputs: ``Sentences/<image_id>.txt`` (five captions, phrases marked ``[/EN#18/people A man]``) and
``Annotations/<image_id>.xml`` (PASCAL-VOC-like: ``<size>``, one ``<object>`` per box with one or more
``<name>`` entity ids and a ``<bndbox>``, or ``<nobndbox>1</nobndbox>`` / ``<scene>1</scene>`` for
entities without a box). Each caption becomes one ``grounded_caption`` sample, id
``flickr30k_<image_id>_<line>``.

- A phrase whose entity has boxes gets **all** of them, listed after the phrase in annotation
  order (no union: a union box would cover the background between, say, two people). The chain
  names each grounded phrase with its box(es); the answer is the caption with the boxes inline.
- Phrases whose entity has no box (``nobndbox``, ``scene``, entity 0 "notvisual", or an entity id
  absent from the XML) stay plain text. A caption with no grounded phrase at all is skipped.
- VOC coordinates are 1-based and inclusive; the pixel box is ``[xmin - 1, ymin - 1, xmax, ymax]``
  (the official toolkit's ``- 1`` on the corners, with an exclusive end).
- Image-level problems (missing/malformed XML, missing image) skip that image's captions with a reason;
  a missing ``Sentences`` / ``Annotations`` folder or split file is an error.
XML is parsed with ``xml.etree.ElementTree`` (its expat refuses entity-expansion bombs).
"""

from __future__ import annotations

import argparse
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from scout_data.boxes import Box
from scout_data.chain import locate
from scout_data.inputs import MAX_TEXT_BYTES, read_input
from scout_data.schema import Sample, Skip, Step
from scout_data.sources._annot import (
    InputFileError,
    check_box,
    image_problem,
    image_size_problem,
    require_dir,
    rng_for,
)
from scout_data.writer import slots

PHRASE_RE = re.compile(r"\[/EN#(\d+)((?:/[^\s/\[\]]+)+)\s+([^\[\]]*?)\s*\]")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,!?;:])")
QUERIES = (
    "Describe the image in one sentence and give the box of each object you mention.",
    "Write a short caption for the image with a bounding box after every object it names.",
    "Give a grounded caption of this image: one sentence, each mentioned object followed by its box.",
)


@dataclass
class Phrase:
    text: str
    entity_id: str
    types: list[str]
    start: int  # character offsets of the phrase text in the plain caption
    end: int


@dataclass
class ImageAnnotation:
    file_name: str | None
    width: int
    height: int
    boxes: dict[str, list[Box]]  # entity id -> pixel xyxy boxes, annotation order
    bad_boxes: dict[str, str]  # entity id -> why one of its boxes is unusable
    no_box: set[str]  # entities marked nobndbox / scene


def parse_sentence(line: str) -> tuple[str, list[Phrase]]:
    """``"[/EN#18/people A man] with ..."`` -> plain caption and its marked phrases.

    Raises ``ValueError`` when brackets are left over after the phrase markup is taken out.
    """
    text_parts: list[str] = []
    phrases: list[Phrase] = []
    pos = 0
    length = 0
    for m in PHRASE_RE.finditer(line):
        before = line[pos : m.start()]
        text_parts.append(before)
        length += len(before)
        body = tidy(m.group(3))
        phrases.append(Phrase(body, m.group(1), m.group(2).strip("/").split("/"), length, length + len(body)))
        text_parts.append(body)
        length += len(body)
        pos = m.end()
    text_parts.append(line[pos:])
    plain = "".join(text_parts)
    if "[" in plain or "]" in plain:
        raise ValueError("unbalanced or unknown [/EN#...] phrase markup")
    return plain, phrases


def parse_annotation(path: str | Path) -> ImageAnnotation:
    """Read one ``Annotations/<id>.xml``; raises ``ValueError`` when it is malformed."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"malformed XML: {e}") from e
    size = root.find("size")
    try:
        width = int(float(size.findtext("width")))  # type: ignore[union-attr,arg-type]
        height = int(float(size.findtext("height")))  # type: ignore[union-attr,arg-type]
    except (AttributeError, TypeError, ValueError):
        raise ValueError("no numeric <size><width>/<height>") from None
    problem = image_size_problem(width, height)
    if problem:
        raise ValueError(problem)
    boxes: dict[str, list[Box]] = {}
    bad: dict[str, str] = {}
    no_box: set[str] = set()
    for obj in root.iter("object"):
        names = [(n.text or "").strip() for n in obj.findall("name")]
        bnd = obj.find("bndbox")
        if bnd is None:
            if _flag(obj, "nobndbox") or _flag(obj, "scene"):
                no_box.update(names)
            continue
        try:
            xmin, ymin, xmax, ymax = (float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            for name in names:
                bad[name] = "a <bndbox> lacks numeric xmin/ymin/xmax/ymax"
            continue
        box, why = check_box((xmin - 1, ymin - 1, xmax, ymax), width, height)
        for name in names:
            if box is None:
                bad[name] = f"box <{xmin:g},{ymin:g},{xmax:g},{ymax:g}>: {why}"
            elif box not in boxes.setdefault(name, []):
                boxes[name].append(box)
    return ImageAnnotation(root.findtext("filename"), width, height, boxes, bad, no_box)


def _flag(obj: ET.Element, tag: str) -> bool:
    text = (obj.findtext(tag) or "0").strip()
    return text not in ("", "0")


def tidy(text: str) -> str:
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", " ".join(text.split()))


def read_split_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Flickr30k split file not found: {p}")
    text = read_input(p, MAX_TEXT_BYTES, "Flickr30k split file").decode("utf-8")
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [i for i in ids if not re.fullmatch(r"[\w.-]+", i)]
    if bad:
        raise InputFileError(f"Flickr30k split file {p}: not image ids: {bad[:3]}")
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sentences", required=True, help="Flickr30k Entities Sentences/ folder")
    parser.add_argument("--annotations", required=True, help="Flickr30k Entities Annotations/ folder")
    parser.add_argument("--images", default=None, help="flickr30k-images folder; missing images are skipped")
    parser.add_argument(
        "--split-file",
        action="append",
        default=None,
        help="train.txt / val.txt / test.txt (repeatable); the file name is the split name",
    )
    parser.add_argument(
        "--split", default="train", help="split name when no --split-file is given (default train)"
    )


def iter_samples(args: argparse.Namespace) -> Iterator[Sample | Skip]:
    return convert_flickr30k(
        args.sentences,
        args.annotations,
        images_dir=args.images,
        split_files=args.split_file,
        split=args.split,
        seed=getattr(args, "seed", 0) or 0,
    )


def convert_flickr30k(
    sentences_dir: str | Path,
    annotations_dir: str | Path,
    images_dir: str | Path | None = None,
    split_files: Sequence[str | Path] | None = None,
    split: str = "train",
    seed: int = 0,
) -> Iterator[Sample | Skip]:
    """One ``grounded_caption`` per caption line, and skips with reasons.

    Missing folders or split files raise before the iterator is returned.
    """
    sent_dir = require_dir(sentences_dir, "Flickr30k Sentences")
    ann_dir = require_dir(annotations_dir, "Flickr30k Annotations")
    if split_files:
        plan = [(Path(f).stem, image_id) for f in split_files for image_id in read_split_file(f)]
    else:
        plan = [(split, p.stem) for p in sorted(sent_dir.glob("*.txt"), key=lambda p: (len(p.stem), p.stem))]
    return (
        item
        for split_name, image_id in plan
        for item in _image_samples(image_id, split_name, sent_dir, ann_dir, images_dir, seed)
    )


def _image_samples(
    image_id: str, split: str, sent_dir: Path, ann_dir: Path, images_dir, seed: int
) -> Iterator[Sample | Skip]:
    sent_path, ann_path = sent_dir / f"{image_id}.txt", ann_dir / f"{image_id}.xml"
    ref = f"Sentences/{image_id}.txt"
    if not sent_path.is_file():
        yield Skip(ref, "no sentences file for this image id")
        return
    if not ann_path.is_file():
        yield Skip(f"Annotations/{image_id}.xml", "annotation file missing; the image's captions are skipped")
        return
    try:
        ann = parse_annotation(ann_path)
    except ValueError as e:
        yield Skip(f"Annotations/{image_id}.xml", f"{e}; the image's captions are skipped")
        return
    file_name = ann.file_name or f"{image_id}.jpg"
    problem = image_problem(images_dir, file_name)
    if problem:
        yield Skip(f"Annotations/{image_id}.xml", problem)
        return
    lines = read_input(sent_path, MAX_TEXT_BYTES, "Flickr30k sentences file").decode("utf-8", "replace").splitlines()
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        lref = f"{ref}:{k + 1}"
        try:
            plain, phrases = parse_sentence(line)
        except ValueError as e:
            yield Skip(lref, str(e))
            continue
        bad = [
            f"entity {p.entity_id} {ann.bad_boxes[p.entity_id]}"
            for p in phrases
            if p.entity_id in ann.bad_boxes
        ]
        if bad:
            yield Skip(lref, "a phrase's box is unusable: " + "; ".join(bad))
            continue
        yield _caption_sample(image_id, k, plain, phrases, ann, file_name, split, seed, lref)


def _caption_sample(
    image_id: str,
    k: int,
    plain: str,
    phrases: list[Phrase],
    ann: ImageAnnotation,
    file_name: str,
    split: str,
    seed: int,
    lref: str,
) -> Sample | Skip:
    sid = f"flickr30k_{image_id}_{k}"
    rng = rng_for(seed, sid)
    steps: list[Step] = []
    caption_parts: list[str] = []
    answer_boxes: list[Box] = []
    grounded: list[dict[str, object]] = []
    pos = 0
    for p in phrases:
        boxes = ann.boxes.get(p.entity_id, []) if p.entity_id != "0" else []
        caption_parts.append(plain[pos : p.end])
        pos = p.end
        if not boxes:
            continue
        caption_parts.append(" " + slots(len(boxes)))
        answer_boxes.extend(boxes)
        steps.append(locate(p.text, p.text, boxes))  # each phrase of the caption with its boxes
        grounded.append(
            {"entity_id": p.entity_id, "phrase": p.text, "types": p.types, "num_boxes": len(boxes)}
        )
    if not answer_boxes:
        return Skip(lref, "no phrase in this caption has a box")
    caption_parts.append(plain[pos:])
    caption = tidy("".join(caption_parts))
    caption = caption[:1].upper() + caption[1:]
    return Sample(
        id=sid,
        image=file_name,
        width=ann.width,
        height=ann.height,
        query=rng.choice(QUERIES),
        kind="grounded_caption",
        steps=steps,
        answer_boxes_xyxy_px=answer_boxes,
        answer_text=caption,
        difficulty="simple",
        split=split,
        source="flickr30k",
        source_ids={"image_id": image_id, "sentence_index": k, "caption": tidy(plain), "phrases": grounded},
    )

"""Synthetic scenes: deterministic, disjoint splits, boxes exact to the drawn pixels, chains correct."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from scout_data.boxes import box_xyxy_norm_to_px, iou
from scout_data.chain import PICK, REFERENCE
from scout_data.output import prepare_out_dir, write_dataset
from scout_data.parse import parse_chain
from scout_data.schema import Sample
from scout_data.sources.synthetic.config import KINDS, add_arguments, config_from_args
from scout_data.sources.synthetic.records import generate, image_folder, iter_samples
from scout_data.sources.synthetic.referring import Desc, Query, resolve, unique_desc
from scout_data.sources.synthetic.scenes import Obj, Scene, make_scene, render_scene
from scout_data.sources.synthetic.vocabulary import vocabulary_text
from scout_data.sources.synthetic.world import CLUTTER, COLOURS, SHAPES, plural
from scout_data.validate import record_problems
from scout_data.writer import render_record

ALL_KINDS = "refexp:3,find_all:1,count:1,grounded_caption:1,region:1,qa:1,region_caption:1"


def synth_args(*flags: str, out: str | None = None, seed: int = 0) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(list(flags))
    args.seed, args.out = seed, out
    return args


def generate_dir(out, *flags, seed=0):
    args = synth_args(*flags, out=str(out), seed=seed)
    prepare_out_dir(str(out), False)
    summary = write_dataset(
        iter_samples(args), str(out), source="synthetic", image_folder=image_folder(args), progress=False
    )
    return summary, {s: json.loads((out / f"{s}.json").read_text()) for s in summary["records"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary, splits = generate_dir(
        out,
        "--num",
        "120",
        "--image-size",
        "128x96",
        "--kinds",
        ALL_KINDS,
        "--clutter",
        "none",
        "--splits",
        "train:0.8,val:0.1,test:0.1",
        "--chain-style",
        "full",
    )
    return out, summary, splits


def test_all_kinds_valid_records(dataset):
    out, summary, splits = dataset
    records = [r for rs in splits.values() for r in rs]
    assert summary["skipped"]["total"] == 0 and len(records) == 120
    assert {r["kind"] for r in records} == set(KINDS)
    for r in records:
        assert record_problems(r, str(out / "images")) == []
        assert r["difficulty"] in ("simple", "hard")
        assert r["image_size"] == [128, 96]
        gpt = r["conversations"][1]["value"]
        if r["kind"] in ("qa", "region_caption"):
            assert r["task"] == "understanding" and not parse_chain(gpt).all_boxes_xyxy_norm()
        else:
            assert r["task"] == "grounding"
        if r["kind"] in ("refexp", "find_all", "count", "grounded_caption"):
            assert gpt.startswith("Step 1: ") and "\nAnswer: " in gpt
    assert {r["difficulty"] for r in records} == {"simple", "hard"}


def test_answer_boxes_are_the_drawn_extent_of_the_referent(dataset):
    out, _, splits = dataset
    checked = 0
    for r in splits["train"]:
        if r["task"] != "grounding":
            continue
        arr = np.asarray(Image.open(out / "images" / r["image"]).convert("RGB")).astype(int)
        h, w = arr.shape[:2]
        objects = r["source_ids"]["objects"]
        targets = r["source_ids"]["targets"]
        chain = parse_chain(r["conversations"][1]["value"])
        assert len(chain.answer_boxes_xyxy_norm) == len(targets)
        for t, norm in zip(targets, chain.answer_boxes_xyxy_norm, strict=True):
            x1, y1, x2, y2 = (int(v) for v in objects[t]["box_xyxy_px"])
            # the stored box is the tight box of the object's colour in its neighbourhood (nothing outside)
            X1, Y1, X2, Y2 = max(0, x1 - 1), max(0, y1 - 1), min(w, x2 + 1), min(h, y2 + 1)
            patch = np.all(arr[Y1:Y2, X1:X2] == COLOURS[objects[t]["colour"]], axis=-1)
            ys, xs = np.nonzero(patch)
            assert (xs.min() + X1, ys.min() + Y1, xs.max() + X1 + 1, ys.max() + Y1 + 1) == (x1, y1, x2, y2)
            # the answer box text is that box, within the 2-decimal rounding of the padded frame
            px = box_xyxy_norm_to_px(norm, w, h, "padded")
            assert (
                max(abs(a - b) for a, b in zip(px, (x1, y1, x2, y2), strict=True)) <= 0.005 * max(w, h) + 1e-6
            )
            checked += 1
    assert checked > 50


def test_chain_semantics(dataset):
    _, _, splits = dataset
    seen = set()
    for r in (r for rs in splits.values() for r in rs):
        chain = parse_chain(r["conversations"][1]["value"])
        q = r["conversations"][0]["value"]
        if r["kind"] == "count":
            assert int(chain.answer_words) == len(chain.answer_boxes_xyxy_norm) >= 1
            seen.add("count")
        if r["kind"] == "refexp" and " left of the " in q:
            anchor = chain.steps[2].boxes_xyxy_norm[0]
            assert chain.answer_boxes_xyxy_norm[0][2] <= anchor[0] + 0.0051
            seen.add("left")
        if r["kind"] == "refexp" and "largest" in q:
            assert chain.answer_boxes_xyxy_norm[0] in chain.steps[1].boxes_xyxy_norm
            seen.add("largest")
        if r["kind"] == "find_all":
            assert len(chain.answer_boxes_xyxy_norm) >= 2
            assert set(chain.answer_boxes_xyxy_norm) <= set(chain.steps[1].boxes_xyxy_norm)
            seen.add("find_all")
        if r["kind"] == "grounded_caption":
            assert len(chain.answer_boxes_xyxy_norm) == len(r["source_ids"]["objects"])
            seen.add("caption")
    assert {"count", "find_all", "caption"} <= seen


def test_resolve_semantics_on_a_hand_built_scene():
    def obj(shape, colour, box, area=100):
        return Obj(shape, colour, "medium", box, area, (0, 0), Image.new("L", (1, 1)))

    scene = Scene(
        200,
        100,
        [
            obj("circle", "red", (10, 10, 30, 30)),
            obj("circle", "red", (150, 10, 170, 30), area=300),
            obj("star", "blue", (80, 10, 100, 30)),
        ],
    )
    assert resolve(Query(Desc("circle", "red"), "left", 2), scene) == [0]
    assert resolve(Query(Desc("circle", "red"), "right", 2), scene) == [1]
    assert resolve(Query(Desc("circle"), superlative="largest"), scene) == [1]
    assert resolve(Query(Desc("circle"), superlative="leftmost"), scene) == [0]
    assert resolve(Query(Desc("circle"), "nearest", 2), scene) == []  # equidistant: ambiguous
    assert unique_desc(scene, 2) == Desc(shape="star")
    assert unique_desc(scene, 0) is None


def _hash_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if f != "summary.json":
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_same_seed_gives_byte_identical_output(tmp_path):
    flags = ("--num", "16", "--image-size", "64", "--kinds", ALL_KINDS, "--random-aspect")
    generate_dir(tmp_path / "a", *flags)
    generate_dir(tmp_path / "b", *flags)
    generate_dir(tmp_path / "c", *flags, seed=1)
    a, b, c = _hash_tree(tmp_path / "a"), _hash_tree(tmp_path / "b"), _hash_tree(tmp_path / "c")
    assert a == b and len(a) == 16 + 4  # 16 images, 3 splits, the run file
    assert a["train.json"] != c["train.json"]


def test_splits_never_share_a_scene(dataset):
    out, _, splits = dataset
    assert {s: len(v) for s, v in splits.items()} == {"train": 96, "val": 12, "test": 12}
    digests = {}
    for split, recs in splits.items():
        digests[split] = {
            hashlib.sha256((out / "images" / r["image"]).read_bytes()).hexdigest() for r in recs
        }
        assert all(r["split"] == split and r["id"].startswith(f"synth-{split}-") for r in recs)
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_canvas_knobs():
    cfg = config_from_args(synth_args("--image-size", "160x96"))
    scene = make_scene(random.Random(0), cfg)
    assert (scene.width, scene.height) == (160, 96) and scene.objects
    cfg = config_from_args(synth_args("--random-aspect", "--aspect-range", "0.5,2"))
    sizes = {(s.width, s.height) for s in (make_scene(random.Random(i), cfg) for i in range(8))}
    assert len(sizes) > 4 and all(0.45 < w / h < 2.2 for w, h in sizes)
    cfg = config_from_args(
        synth_args(
            "--max-overlap",
            "0.3",
            "--min-objects",
            "6",
            "--max-objects",
            "6",
            "--shapes",
            "circle,star",
            "--colours",
            "red",
        )
    )
    scene = make_scene(random.Random(3), cfg)
    assert {o.shape for o in scene.objects} <= {"circle", "star"} and {o.colour for o in scene.objects} == {
        "red"
    }
    assert all(iou(a.box, b.box) <= 0.3 for a in scene.objects for b in scene.objects if a is not b)
    for style in CLUTTER:
        cfg = config_from_args(synth_args("--clutter", style, "--image-size", "64"))
        im = render_scene(make_scene(random.Random(1), cfg), random.Random(1), cfg)
        assert im.size == (64, 64)
    with pytest.raises(ValueError, match="unknown kind"):
        config_from_args(synth_args("--kinds", "refexp:1,bogus:1"))
    with pytest.raises(ValueError, match="image-size"):
        config_from_args(synth_args("--image-size", "big"))


def test_vocabulary_covers_every_phrase_the_generator_produces():
    vocab = vocabulary_text(seed=0, n=120)
    words = {w.lower() for t in vocab for w in re.findall(r"[A-Za-z<>]+", t)}  # a word at a line's start, too
    cfg = config_from_args(synth_args("--kinds", ALL_KINDS))
    fresh = 0
    for i in range(80):
        got, _ = generate(7, "train", i, cfg)
        assert isinstance(got, Sample)
        rec = render_record(got)
        text = " ".join(t["value"] for t in rec["conversations"])
        # box texts are numbers; every other word must be in the corpus
        missing = {w.lower() for w in re.findall(r"[A-Za-z<>]+", text)} - words
        assert not missing, missing
        fresh += 1
    assert fresh == 80


def test_worker_processes_give_the_same_bytes(tmp_path):
    flags = ("--num", "70", "--image-size", "48", "--kinds", ALL_KINDS, "--clutter", "none,lines")
    generate_dir(tmp_path / "one", *flags)
    generate_dir(tmp_path / "two", *flags, "--workers", "2")
    assert _hash_tree(tmp_path / "one") == _hash_tree(tmp_path / "two")


def test_grid_world_puts_each_object_in_its_own_cell_with_few_box_values(tmp_path):
    _, splits = generate_dir(tmp_path / "grid", "--num", "200", "--image-size", "64", "--grid", "4",
                             "--kinds", "refexp:1,region:1,qa:1", "--min-objects", "2", "--max-objects", "4",
                             "--sizes", "medium,large", "--clutter", "none", "--splits", "train:1")
    cfg = config_from_args(synth_args("--image-size", "64", "--grid", "4", "--sizes", "medium,large",
                                        "--min-objects", "2", "--max-objects", "4"))
    for i in range(50):
        scene = make_scene(random.Random(i), cfg)
        cells = [(int(o.cx // 16), int(o.cy // 16)) for o in scene.objects]
        assert len(set(cells)) == len(cells) >= 2
        for o, (c, r) in zip(scene.objects, cells, strict=True):  # inside its cell, centred
            assert c * 16 <= o.box[0] < o.box[2] <= (c + 1) * 16 and r * 16 <= o.box[1] < o.box[3] <= (r + 1) * 16
    coords = {v for r in splits["train"] for v in re.findall(r"\d\.\d\d", r["conversations"][1]["value"])}
    assert 0 < len(coords) <= 40  # anywhere in the image, two-decimal coordinates take 101 values
    with pytest.raises(ValueError, match="--grid"):
        config_from_args(synth_args("--grid", "2", "--max-objects", "5"))


def test_region_captions_name_the_object_in_the_prompts_box_by_its_shortest_description(tmp_path):
    flags = ("--num", "120", "--image-size", "64", "--grid", "4", "--min-objects", "1", "--max-objects", "4",
             "--clutter", "none", "--splits", "train:1")
    _, splits = generate_dir(tmp_path / "rc", *flags, "--kinds", "region_caption:1")
    names = Counter()
    for r in splits["train"]:
        box = [float(v) for v in re.findall(r"\d\.\d\d", r["conversations"][0]["value"])]
        objects = r["source_ids"]["objects"]
        (target,) = [o for o in objects if [round(v / 64, 2) for v in o["box_xyxy_px"]] == box]
        name = r["conversations"][1]["value"]
        words = name.removeprefix("the ").split()
        assert name.startswith("the ") and r["task"] == "understanding" and r["kind"] == "region_caption"
        assert all(w in (target["shape"], target["colour"], target["size"], "object") for w in words), (name, target)
        fits = [o for o in objects if all(w in (o["shape"], o["colour"], o["size"], "object") for w in words)]
        assert fits == [target] or len(words) == 3, (name, objects)  # unique, or every attribute when none is
        names[len(words)] += 1
    assert names[1] and names[2]  # shortest descriptions: a shape alone or with a colour or size


def test_terse_chains_locate_each_candidate_as_a_one_shot_prompt_names_it(tmp_path):
    flags = ("--num", "200", "--image-size", "64", "--grid", "4", "--min-objects", "2", "--max-objects", "4",
             "--kinds", "refexp:4,find_all:1,count:1,region:1", "--clutter", "none", "--splits", "train:1")
    _, terse = generate_dir(tmp_path / "terse", *flags, "--chain-style", "terse")
    _, full = generate_dir(tmp_path / "full", *flags, "--chain-style", "full")
    seen = set()
    for r, f in zip(terse["train"], full["train"], strict=True):
        assert r["image"] == f["image"]  # same scenes, other wording
        if r["kind"] == "region":
            continue
        chain = parse_chain(r["conversations"][1]["value"])
        step_boxes = [b for s in chain.steps for b in s.boxes_xyxy_norm]
        for step in r["steps"]:
            # an object named as a one-shot region prompt names it (its shortest unique description), then its box
            assert re.fullmatch(r"the ((small|medium|large) )?([a-z]+ )?[a-z]+ \[[\d., ]+\]\.", step["text"]), step

            assert len(step["boxes_xyxy_norm"]) == 1
        assert set(chain.answer_boxes_xyxy_norm) <= set(step_boxes)
        relation = re.search(r" (left of|right of|above|below) the ", r["conversations"][0]["value"])
        if r["kind"] == "refexp" and relation:  # the anchor comes first, and the answer stands where it says
            a, t = chain.steps[0].boxes_xyxy_norm[0], chain.answer_boxes_xyxy_norm[0]
            holds = {"left of": t[2] <= a[0], "right of": t[0] >= a[2], "above": t[3] <= a[1], "below": t[1] >= a[3]}
            assert holds[relation.group(1)], (r["conversations"], chain)
            seen.add("relation")
        seen.add(r["kind"])
        assert len(r["conversations"][1]["value"]) < len(f["conversations"][1]["value"])
    assert {"refexp", "find_all", "count", "relation"} <= seen


def _words(phrase: str) -> set[str]:
    return set(re.findall(r"[a-z]+", phrase))


def _singular(words: set[str]) -> set[str]:
    nouns = {**{plural(s): s for s in SHAPES}, "objects": "object"}
    return {nouns.get(w, w) for w in words}


def _desc_fits(words: set[str], o: dict) -> bool:
    return _singular(words) - {"the", "object"} <= {o["shape"], o["colour"], o["size"]}


def test_decide_chains_pose_the_expressions_own_sub_questions_and_the_last_step_decides(tmp_path):
    """The default grammar: the candidates in the expression's words (the boxes of exactly the objects its noun
    phrase names, left to right), a relation's reference object (the anchor's box), then the pick with the
    target's box, which the answer copies."""
    flags = ("--num", "300", "--image-size", "64", "--grid", "4", "--min-objects", "2", "--max-objects", "4",
             "--kinds", "refexp:4,find_all:1", "--refexp-types", "attribute:1,relation:2,superlative:1",
             "--clutter", "none", "--splits", "train:1")
    summary, got = generate_dir(tmp_path / "d", *flags)
    assert summary["skipped"]["total"] == 0
    seen = Counter()
    for r in got["train"]:
        chain = parse_chain(r["conversations"][1]["value"])
        objects = r["source_ids"]["objects"]
        px = [[box_xyxy_norm_to_px(b, 64, 64, "padded") for b in s.boxes_xyxy_norm] for s in chain.steps]
        on = [[max(range(len(objects)), key=lambda j: iou(b, objects[j]["box_xyxy_px"])) for b in boxes]
              for boxes in px]
        *locates, last = chain.steps
        assert chain.answer_boxes_xyxy_norm == last.boxes_xyxy_norm  # the answer copies the deciding step
        for idx in on:
            b = [objects[j]["box_xyxy_px"] for j in range(len(objects))]
            assert idx == sorted(idx, key=lambda j: (b[j][0] + b[j][2], b[j][1] + b[j][3]))  # centres, left to right
        if r["kind"] == "find_all":
            seen["find_all"] += 1
            continue
        expression, kind = r["expression"], r["source_ids"]["expression_type"]
        target = r["source_ids"]["targets"][0]
        phrase = re.split(r":", last.text)[0]
        assert on[-1] == [target]
        if r["kind"] == "refexp" and len(chain.steps) > 1:
            assert phrase == PICK
        for step, idx in zip(locates, on[:-1], strict=True):  # a phrase of the expression, and every object it names
            if step.text.startswith(REFERENCE):
                continue
            words = _words(step.text.split("[")[0])
            assert _singular(words) <= _singular(_words(expression)), (expression, step.text)
            assert all(_desc_fits(words, objects[j]) for j in idx), (step.text, objects)
        if kind == "relation":
            anchor_words = expression.split(" the ")[-1]
            assert len(chain.steps) == 3 and chain.steps[1].text.startswith(f"{REFERENCE} [")
            assert len(on[1]) == 1 and _desc_fits(_words(anchor_words), objects[on[1][0]])
        elif kind == "superlative":
            assert len(chain.steps) == 2
            noun_words = _words(chain.steps[0].text.split("[")[0])
            assert len(on[0]) == sum(_desc_fits(noun_words, o) for o in objects) >= 2
        else:
            assert len(chain.steps) in (1, 2)
        seen[kind] += 1
    assert min(seen[k] for k in ("attribute", "relation", "superlative", "find_all")) >= 10, seen


def test_understanding_questions_carry_their_type(tmp_path):
    """The eval splits understanding accuracy by question type (a binding failure shows in colour and exists
    questions while shape questions pass), so each type label must be the question actually asked."""
    from llava_twist.eval.scout_questions import question_for

    _, splits = generate_dir(tmp_path / "d", "--num", "200", "--image-size", "64", "--kinds", "qa:1", "--grid", "4",
                             "--min-objects", "1", "--max-objects", "4", "--splits", "train:1")
    world = {"colour": set(COLOURS), "shape": set(SHAPES)}
    seen = Counter()
    for r in splits["train"]:
        t = r["source_ids"]["question_type"]
        seen[t] += 1
        answer, query = r["answer_text"], r["query"]
        if t in world:
            assert answer in world[t], (t, query, answer)
        elif t in ("exists", "relation"):
            assert answer in ("Yes", "No"), (t, query, answer)
        elif t == "count":
            assert query.startswith("How many"), (t, query)
        else:
            assert t == "caption" and "single word" not in query, (t, query)
        assert question_for(r)[1]["question_type"] == t
    assert set(seen) == {"colour", "shape", "count", "exists", "relation", "caption"}

"""``python -m scout_data <source> --out DIR ...`` end to end on the real-format fixtures."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scout_data", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _images(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    for rel, size in sizes.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 150)).save(folder / rel)
    return folder


def _read(out: Path) -> tuple[dict[str, list[dict]], dict]:
    summary = json.loads((out / "summary.json").read_text())
    splits = {s: json.loads((out / f"{s}.json").read_text()) for s in summary["records"]}
    return splits, summary


def _examples(summary: dict) -> str:
    return "\n".join(e for ex in summary["skipped"]["examples"].values() for e in ex)


def _valid(path: Path, images: Path) -> None:
    res = _cli("validate", str(path), "--image-folder", str(images))
    assert res.returncode == 0, res.stdout + res.stderr


def test_coco_cli(tmp_path):
    images = _images(tmp_path / "val2017", {"000000000001.jpg": (640, 480), "000000000003.jpg": (320, 240)})
    out = tmp_path / "out"
    res = _cli(
        "coco",
        "--out",
        str(out),
        "--instances",
        str(FIXTURES / "coco" / "instances_mini.json"),
        "--images",
        str(images),
        "--split",
        "val",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    splits, summary = _read(out)
    ids = {r["id"] for r in splits["val"]}
    assert {"coco_1_find_18", "coco_1_count_18", "coco_1_rel_18_left_17", "coco_3_find_18"} <= ids
    rec = next(r for r in splits["val"] if r["id"] == "coco_1_find_18")
    assert rec["image"] == "000000000001.jpg" and rec["answer_boxes_xyxy_px"][0] == [
        10.0,
        100.0,
        110.0,
        180.0,
    ]
    assert summary["image_folder"] == str(images.resolve())
    text = _examples(summary)
    assert "instances_mini.json:ann 301: zero-area box" in text
    assert (
        "instances_mini.json:image 1 category person: category not used in this image: an iscrowd=1" in text
    )
    assert "instances_mini.json:image 4: image file 000000000004.jpg not found" in text
    _valid(out / "val.json", images)


def test_refcoco_cli_keeps_splits(tmp_path):
    refs = json.loads((FIXTURES / "refcoco" / "refs(unc).json").read_text())
    refs_path = tmp_path / "refcoco" / "refs(unc).p"
    refs_path.parent.mkdir()
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    images = _images(
        tmp_path / "train2014",
        {"COCO_train2014_000000581857.jpg": (640, 427), "COCO_train2014_000000000025.jpg": (426, 640)},
    )
    out = tmp_path / "out"
    res = _cli(
        "refcoco",
        "--out",
        str(out),
        "--refs",
        str(refs_path),
        "--instances",
        str(FIXTURES / "refcoco" / "instances.json"),
        "--images",
        str(images),
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    splits, summary = _read(out)
    assert {s: sorted(r["id"] for r in recs) for s, recs in splits.items()} == {
        "testA": ["refcoco_1_2", "refcoco_1_3", "refcoco_1_4"],
        "testB": ["refcoco_3_6"],
        "train": ["refcoco_0_0", "refcoco_0_1"],
        "val": ["refcoco_4_8"],
    }
    assert "refs(unc).p:ref 2: ann_id 9999 is not in the instances file" in _examples(summary)
    for split in splits:
        _valid(out / f"{split}.json", images)


def test_refcoco_cli_refuses_unsafe_pickle(tmp_path):
    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    res = _cli(
        "refcoco",
        "--out",
        str(tmp_path / "out"),
        "--refs",
        str(evil),
        "--instances",
        str(FIXTURES / "refcoco" / "instances.json"),
        "--quiet",
    )
    assert res.returncode == 2
    assert "refusing to load global posix.system" in res.stderr and "Traceback" not in res.stderr


def test_flickr30k_cli(tmp_path):
    root = FIXTURES / "flickr30k"
    images = _images(tmp_path / "flickr30k-images", {"1000092795.jpg": (500, 375), "3000.jpg": (333, 500)})
    out = tmp_path / "out"
    res = _cli(
        "flickr30k",
        "--out",
        str(out),
        "--sentences",
        str(root / "Sentences"),
        "--annotations",
        str(root / "Annotations"),
        "--images",
        str(images),
        "--split-file",
        str(root / "train.txt"),
        "--split-file",
        str(root / "test.txt"),
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    splits, summary = _read(out)
    assert sorted(r["id"] for r in splits["train"]) == [
        "flickr30k_1000092795_0",
        "flickr30k_1000092795_1",
        "flickr30k_1000092795_4",
        "flickr30k_3000_1",
    ]
    rec = next(r for r in splits["train"] if r["id"] == "flickr30k_1000092795_0")
    assert rec["conversations"][1]["value"].splitlines()[-1].startswith("Answer: Two young guys [")
    text = _examples(summary)
    assert "Sentences/1000092795.txt:4: no phrase in this caption has a box" in text
    assert "Annotations/4000.xml: malformed XML" in text
    _valid(out / "train.json", images)


def test_vg_cli(tmp_path):
    root = FIXTURES / "vg"
    images = _images(tmp_path / "vg", {"VG_100K_2/1.jpg": (800, 600), "VG_100K/2.jpg": (500, 333)})
    out = tmp_path / "out"
    res = _cli(
        "vg",
        "--out",
        str(out),
        "--image-data",
        str(root / "image_data.json"),
        "--regions",
        str(root / "region_descriptions.json"),
        "--objects",
        str(root / "objects.json"),
        "--images",
        str(images),
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    splits, summary = _read(out)
    assert sorted(r["id"] for r in splits["train"]) == [
        "vg_1_count_horse",
        "vg_1_count_man",
        "vg_1_find_horse",
        "vg_1_find_man",
        "vg_region_11",
        "vg_region_13",
        "vg_region_21",
    ]
    text = _examples(summary)
    assert "region_descriptions.json:region 12: duplicate of region 11" in text
    assert "objects.json:object 106: box [710.0, 20.0, 830.0, 110.0] lies outside the 800x600 image" in text
    _valid(out / "train.json", images)

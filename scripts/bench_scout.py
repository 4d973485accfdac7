"""SCOUT data engine throughput: records per second for each benchmark in BENCHMARKS.

    python scripts/bench_scout.py [--num 500] [--only synthetic_png]

Each benchmark is ``fn(tmp_dir, num) -> (records, seconds)``; add converters by appending to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scout_data.cli import main as scout_main  # noqa: E402

Benchmark = Callable[[str, int], tuple[int, float]]


def _synth(tmp: str, num: int, *flags: str) -> tuple[int, float]:
    out = os.path.join(tmp, "out")
    t = time.perf_counter()
    rc = scout_main(["synth", "--out", out, "--num", str(num), "--image-size", "336", "--quiet", *flags])
    seconds = time.perf_counter() - t
    if rc:
        raise RuntimeError(f"synth exited {rc}")
    return num, seconds


def synthetic_png(tmp: str, num: int) -> tuple[int, float]:
    """336 px scenes written as PNG, default kind mix, one process."""
    return _synth(tmp, num, "--image-format", "png")


def synthetic_jpeg(tmp: str, num: int) -> tuple[int, float]:
    """336 px scenes written as JPEG (quality 90), one process."""
    return _synth(tmp, num, "--image-format", "jpg")


def synthetic_png_workers(tmp: str, num: int) -> tuple[int, float]:
    """336 px PNG scenes with one rendering process per CPU."""
    return _synth(tmp, num, "--image-format", "png", "--workers", str(os.cpu_count() or 1))


def synthetic_text_only(tmp: str, num: int) -> tuple[int, float]:
    """Scene layout, query and chain only (no pixels): what vocabulary_text costs per record."""
    from scout_data.sources.synthetic.config import KINDS, SynthConfig
    from scout_data.sources.synthetic.records import generate
    from scout_data.writer import render_record

    cfg = SynthConfig(kinds={k: 1.0 for k in KINDS})
    t = time.perf_counter()
    for i in range(num):
        sample, _ = generate(0, "train", i, cfg)
        render_record(sample)  # type: ignore[arg-type]
    return num, time.perf_counter() - t


BENCHMARKS: list[Benchmark] = [synthetic_png, synthetic_jpeg, synthetic_png_workers, synthetic_text_only]


# --- real-annotation converters (coco, refcoco) on a generated COCO-format fixture ---------------------

CONVERTER_MIN_ANNOTATIONS = 50_000


def _coco_fixture(
    tmp: str, num_annotations: int, per_image: int = 10, seed: int = 0
) -> tuple[str, list[dict]]:
    """A COCO instances JSON with ``num_annotations`` boxes (80 categories, 10 per image, ~1% crowd,
    ~0.5% zero-area), written to ``tmp``."""
    import json
    import random

    rng = random.Random(seed)
    cats = [{"id": i + 1, "name": f"thing{i}", "supercategory": "thing"} for i in range(80)]
    images: list[dict] = []
    anns: list[dict] = []
    for i in range(max(1, num_annotations // per_image)):
        w, h = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375)])
        images.append({"id": i + 1, "file_name": f"COCO_train2014_{i + 1:012d}.jpg", "width": w, "height": h})
        pool = rng.sample(cats, 4)
        for _ in range(per_image):
            bw, bh = rng.uniform(20, w / 3), rng.uniform(20, h / 3)
            x, y, r = rng.uniform(0, w - bw), rng.uniform(0, h - bh), rng.random()
            bbox = [round(x, 2), round(y, 2), round(bw, 2) if r > 0.005 else 0.0, round(bh, 2)]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": rng.choice(pool)["id"],
                         "bbox": bbox, "area": bw * bh, "iscrowd": int(r > 0.99), "segmentation": []})
    path = os.path.join(tmp, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return path, anns


def _refs_fixture(tmp: str, anns: list[dict], seed: int = 0) -> str:
    """``refcoco/refs(unc).p``: one ref per non-crowd annotation, 1-3 sentences each, pickled (protocol 2)."""
    import pickle
    import random

    rng = random.Random(seed)
    refs, sent_id = [], 0
    for k, a in enumerate(anns):
        if a["iscrowd"]:
            continue
        sents = []
        for _ in range(rng.randint(1, 3)):
            sents.append({"sent": f"thing number {sent_id}", "raw": f"Thing number {sent_id}", "tokens": [],
                          "sent_id": sent_id})
            sent_id += 1
        refs.append({"ref_id": k, "ann_id": a["id"], "image_id": a["image_id"],
                     "category_id": a["category_id"], "split": rng.choice(["train", "val", "testA", "testB"]),
                     "sentences": sents,
                     "sent_ids": [s["sent_id"] for s in sents],
                     "file_name": f"COCO_train2014_{a['image_id']:012d}_{a['id']}.jpg"})
    path = os.path.join(tmp, "refcoco", "refs(unc).p")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return path


def _count_samples(items) -> int:
    from scout_data.schema import Sample

    return sum(isinstance(x, Sample) for x in items)


def coco_convert(tmp: str, num: int) -> tuple[int, float]:
    """COCO converter alone (load + samples, no rendering) on max(--num, 50k) annotations."""
    from scout_data.sources.coco import convert_coco

    instances, _ = _coco_fixture(tmp, max(num, CONVERTER_MIN_ANNOTATIONS))
    t = time.perf_counter()
    n = _count_samples(convert_coco(instances))
    return n, time.perf_counter() - t


def coco_cli(tmp: str, num: int) -> tuple[int, float]:
    """`scout-data coco` end to end (convert, render, validate, write JSON) on max(--num, 50k) annotations."""
    instances, _ = _coco_fixture(tmp, max(num, CONVERTER_MIN_ANNOTATIONS))
    out = os.path.join(tmp, "out")
    t = time.perf_counter()
    if scout_main(["coco", "--out", out, "--instances", instances, "--quiet"]):
        raise RuntimeError("coco conversion failed")
    return _written(out), time.perf_counter() - t


def refcoco_convert(tmp: str, num: int) -> tuple[int, float]:
    """RefCOCO converter alone (safe unpickling + samples, no rendering), one ref per annotation."""
    from scout_data.sources.refcoco import convert_refcoco

    instances, anns = _coco_fixture(tmp, max(num, CONVERTER_MIN_ANNOTATIONS))
    refs = _refs_fixture(tmp, anns)
    t = time.perf_counter()
    n = _count_samples(convert_refcoco(refs, instances))
    return n, time.perf_counter() - t


def refcoco_cli(tmp: str, num: int) -> tuple[int, float]:
    """`scout-data refcoco` end to end (convert, render, validate, write JSON per split)."""
    instances, anns = _coco_fixture(tmp, max(num, CONVERTER_MIN_ANNOTATIONS))
    refs = _refs_fixture(tmp, anns)
    out = os.path.join(tmp, "out")
    t = time.perf_counter()
    if scout_main(["refcoco", "--out", out, "--refs", refs, "--instances", instances, "--quiet"]):
        raise RuntimeError("refcoco conversion failed")
    return _written(out), time.perf_counter() - t


def _written(out: str) -> int:
    import json

    with open(os.path.join(out, "summary.json")) as f:
        return sum(json.load(f)["records"].values())


BENCHMARKS += [coco_convert, coco_cli, refcoco_convert, refcoco_cli]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=500, help="records per benchmark")
    p.add_argument("--only", nargs="*", help="benchmark names to run")
    args = p.parse_args()
    for fn in BENCHMARKS:
        if args.only and fn.__name__ not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            n, s = fn(tmp, args.num)
        print(f"{fn.__name__:24s} {n:7d} records {s:8.2f} s {n / s:9.1f} records/s   ({fn.__doc__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

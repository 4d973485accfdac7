"""The playground's example scenes: ``examples.json`` (image, query, kind, reference chain, answer boxes in
pixels) beside the images. ``python -m playground.make_examples`` regenerates the bundled ones
(``playground/examples/``: a few small, non-square SCOUT synthetic scenes); ``make demo`` writes held-out scenes
of its model's own world with :func:`write_record_examples`.

    python -m playground.make_examples
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scout_data.sources.synthetic.config import SynthConfig
from scout_data.sources.synthetic.records import generate
from scout_data.sources.synthetic.scenes import render_scene
from scout_data.writer import render_gpt, render_prompt

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLES_FILE = "examples.json"
SIZES = ((448, 320), (320, 448), (512, 288), (384, 384))
KINDS = ("refexp", "find_all", "count", "refexp")


def write_examples(out_dir: str | Path = EXAMPLES_DIR, seed: int = 0) -> list[dict]:
    """Write one PNG per entry of ``SIZES`` and ``examples.json`` (image, query, reference chain, boxes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, ((w, h), kind) in enumerate(zip(SIZES, KINDS, strict=True)):
        cfg = SynthConfig(width=w, height=h, clutter=("none",), min_objects=3, max_objects=5, kinds={kind: 1.0})
        sample, scene = generate(seed, "example", i, cfg)
        if scene is None:
            raise RuntimeError(f"example {i}: {sample}")
        attempt = sample.source_ids["attempt"]
        image = render_scene(scene, random.Random(f"scout-synth:{seed}:example:{i}:{attempt}:render"), cfg)
        name = f"scene_{i}_{w}x{h}.png"
        image.convert("P", palette=1, colors=32).save(out / name, optimize=True)
        entries.append(
            {
                "image": name,
                "query": render_prompt(sample.query, sample.kind),
                "kind": sample.kind,
                "reference": render_gpt(sample),
                "answer_boxes_xyxy_px": [list(b) for b in sample.answer_boxes_xyxy_px],
            }
        )
    (out / EXAMPLES_FILE).write_text(json.dumps(entries, indent=2) + "\n")
    return entries


def write_record_examples(records: Sequence[dict[str, Any]], image_folder: str | Path, out_dir: str | Path,
                          queries: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Examples from SCOUT records (LLaVA conversation JSON with ``answer_boxes_xyxy_px``), their images copied
    into ``out_dir`` beside ``examples.json``; each asked with its record's prompt, or with ``queries``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if queries is not None and len(queries) != len(records):
        raise ValueError(f"{len(queries)} queries for {len(records)} records")
    entries = []
    for i, r in enumerate(records):
        name = Path(r["image"]).name
        shutil.copyfile(Path(image_folder) / r["image"], out / name)
        human, gpt = (t["value"] for t in r["conversations"][:2])
        query = queries[i] if queries is not None else human.replace("<image>", "").strip()
        entries.append({"image": name, "query": query, "kind": r.get("kind"),
                        "reference": gpt, "answer_boxes_xyxy_px": r["answer_boxes_xyxy_px"]})
    (out / EXAMPLES_FILE).write_text(json.dumps(entries, indent=2) + "\n")
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m playground.make_examples", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=str(EXAMPLES_DIR))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for e in write_examples(args.out, args.seed):
        print(f"{e['image']}: {e['query']}")


if __name__ == "__main__":
    main()

"""Records: one seeded sample per (seed, split, index), images written, worker processes, the CLI's entry."""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Container, Iterator
from dataclasses import dataclass

from PIL import Image

from scout_data.output import atomic_write
from scout_data.schema import Sample, Skip
from scout_data.sources.synthetic.config import SynthConfig, config_from_args, split_counts
from scout_data.sources.synthetic.queries import _pick, build_query, check_built
from scout_data.sources.synthetic.scenes import Scene, make_scene, render_scene
from scout_data.sources.synthetic.world import NAME


@dataclass
class _Job:
    seed: int
    split: str
    index: int
    out_dir: str | None


def record_id(split: str, index: int) -> str:
    return f"synth-{split}-{index:07d}"


def generate(seed: int, split: str, index: int, cfg: SynthConfig) -> tuple[Sample | Skip, Scene | None]:
    """The sample for one record (no image written); the scene to render comes with it."""
    rid = record_id(split, index)
    kind = _pick(random.Random(f"scout-synth:{seed}:{split}:{index}:kind"), cfg.kinds)
    for attempt in range(cfg.max_attempts):
        rng = random.Random(f"scout-synth:{seed}:{split}:{index}:{attempt}")
        scene = make_scene(rng, cfg)
        b = build_query(rng, scene, kind, cfg)
        if b is None or check_built(b, scene):
            continue
        ext = "jpg" if cfg.image_format == "jpg" else "png"
        sample = Sample(
            id=rid,
            image=f"{split}/{rid}.{ext}",
            width=scene.width,
            height=scene.height,
            query=b.query,
            kind=b.kind,  # type: ignore[arg-type]
            task=b.task,  # type: ignore[arg-type]
            steps=b.steps,
            answer_boxes_xyxy_px=[scene.objects[j].box for j in b.targets],
            answer_text=b.answer_text,
            expression=b.expression,
            query_boxes_xyxy_px=list(b.query_boxes),
            difficulty=b.difficulty,  # type: ignore[arg-type]
            split=split,
            source=NAME,
            source_ids={
                "seed": seed,
                "index": index,
                "attempt": attempt,
                "targets": b.targets,
                **({"question_type": b.question_type} if b.question_type else {}),
                **({"expression_type": b.expression_type} if b.expression_type else {}),
                "objects": [
                    {"shape": o.shape, "colour": o.colour, "size": o.size, "box_xyxy_px": list(o.box)}
                    for o in scene.objects
                ],
            },
        )
        return sample, scene
    return Skip(rid, f"no {kind} query fits a scene after {cfg.max_attempts} attempts"), None


def save_image(im: Image.Image, path: str, cfg: SynthConfig) -> None:
    """Atomic write through the output guard's :func:`atomic_write` (its temporaries are the ones a resumed run
    removes)."""

    def write(tmp: str) -> None:
        if cfg.image_format == "jpg":
            im.save(tmp, format="JPEG", quality=cfg.jpeg_quality)
        else:
            im.save(tmp, format="PNG", compress_level=1)

    atomic_write(path, write)


def make_record(job: _Job, cfg: SynthConfig) -> Sample | Skip:
    got, scene = generate(job.seed, job.split, job.index, cfg)
    if isinstance(got, Sample) and scene is not None and job.out_dir is not None:
        attempt = got.source_ids["attempt"]
        im = render_scene(
            scene, random.Random(f"scout-synth:{job.seed}:{job.split}:{job.index}:{attempt}:render"), cfg
        )
        save_image(im, os.path.join(job.out_dir, got.image), cfg)
    return got


_WORKER_CFG: SynthConfig | None = None


def _init_worker(cfg: SynthConfig) -> None:
    global _WORKER_CFG
    _WORKER_CFG = cfg


def _work(job: _Job) -> Sample | Skip:
    assert _WORKER_CFG is not None
    return make_record(job, _WORKER_CFG)


def image_folder(args: argparse.Namespace) -> str:
    """The folder to pass to LLaVA as ``--image_folder`` (image paths in the JSON are relative to it)."""
    return os.path.join(args.out, "images")


def estimate_total(args: argparse.Namespace) -> int:
    return int(args.num)


def iter_samples(args: argparse.Namespace) -> Iterator[Sample | Skip]:
    """Samples for every split (images written under ``image_folder(args)``); ids in ``args.skip_ids``
    (set by ``--resume``) are neither generated nor yielded."""
    cfg = config_from_args(args)
    skip: Container[str] = getattr(args, "skip_ids", None) or ()
    folder = image_folder(args) if getattr(args, "out", None) else None
    jobs = [
        _Job(int(args.seed), split, i, folder)
        for split, n in split_counts(int(args.num), args.splits).items()
        for i in range(n)
        if record_id(split, i) not in skip
    ]
    workers = max(1, int(getattr(args, "workers", 1) or 1))
    if workers == 1 or len(jobs) < 64:
        for job in jobs:
            yield make_record(job, cfg)
        return
    import multiprocessing as mp

    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        yield from pool.imap(_work, jobs, chunksize=16)



def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError on bad flags before anything is written."""
    config_from_args(args)
    split_counts(int(args.num), args.splits)
    if int(args.num) < 0:
        raise ValueError("--num must be >= 0")

"""Pretrain the tiny CLIP vision tower on the synthetic world: the demo's stand-in for CLIP's own pretraining.

LLaVA never trains its vision tower (it reads CLIP's penultimate layer under ``torch.no_grad``), so a LLaVA
built on a randomly initialised tiny CLIP is blind for any training budget that fits a demo: its patch features
are a random projection of pixels whose position signal is lost under the layer norm. A real LLaVA starts from
a CLIP that already knows what is where; this gives the tiny tower the same start. It is trained densely at the
layer LLaVA reads (``mm_vision_select_layer``): for every patch, the shape, colour and size of the object under
it (or background), the patch's row and column, and that object's box; the heads are thrown away and only the
``CLIPVisionModel`` is saved back, in place, in its usual format.

    python -m playground.miniature.vision_pretrain --tower checkpoints/tiny-llava/clip-vision-tower \\
        --image-size 64 --shapes circle,square --colours red,blue
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm
from transformers import CLIPImageProcessor, CLIPVisionModel

from llava_twist.spec_cli import add_spec_arguments, spec_from_args
from scout_data.output import atomic_write_text
from scout_data.sources.synthetic.config import SynthConfig, add_arguments, config_from_args
from scout_data.sources.synthetic.scenes import make_scene, render_scene

HEADS = ("shape", "colour", "size", "row", "col")


@dataclass(frozen=True)
class VisionPretrainSpec:
    """Dense pretraining of the tiny tower (``scenes`` rendered once, ``steps`` batches drawn from them)."""

    scenes: int = 6000
    steps: int = 600
    batch: int = 64
    lr: float = 2e-3
    min_cover: float = 0.125  # share of a patch an object must cover to be that patch's label
    eval_scenes: int = 256


def patch_labels(scene, cfg: SynthConfig, grid: int, min_cover: float) -> dict[str, np.ndarray]:
    """Per patch (row-major, ``grid`` x ``grid``): class indices (0 = background) and the object's box in [0, 1]."""
    w, h = scene.width, scene.height
    owner = np.full((h, w), -1, dtype=np.int64)
    for i, o in enumerate(scene.objects):
        x0, y0 = o.offset
        mask = np.asarray(o.mask) > 0
        ys, xs = np.nonzero(mask)
        ys, xs = ys + y0, xs + x0
        keep = (ys < h) & (xs < w)
        owner[ys[keep], xs[keep]] = i
    ph, pw = h // grid, w // grid
    n = len(scene.objects)
    labels = {k: np.zeros(grid * grid, dtype=np.int64) for k in ("shape", "colour", "size")}
    labels["box"] = np.zeros((grid * grid, 4), dtype=np.float32)
    labels["on_object"] = np.zeros(grid * grid, dtype=bool)
    for r in range(grid):
        for c in range(grid):
            cell = owner[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
            counts = np.bincount(cell[cell >= 0], minlength=n) if n else np.zeros(0)
            if not n or counts.max() < min_cover * ph * pw:
                continue
            o = scene.objects[int(counts.argmax())]
            k = r * grid + c
            labels["shape"][k] = cfg.shapes.index(o.shape) + 1
            labels["colour"][k] = cfg.colours.index(o.colour) + 1
            labels["size"][k] = cfg.sizes.index(o.size) + 1
            labels["box"][k] = (o.box[0] / w, o.box[1] / h, o.box[2] / w, o.box[3] / h)
            labels["on_object"][k] = True
    return labels


def render_set(cfg: SynthConfig, processor, grid: int, n: int, seed: str, min_cover: float,
               desc: str) -> dict[str, torch.Tensor]:
    """``n`` scenes of the world ``cfg``, preprocessed as LLaVA does (square images), with their patch labels."""

    images, rows = [], []
    for i in tqdm(range(n), desc=desc, unit="scene", file=sys.stderr, mininterval=2.0):
        rng = random.Random(f"vision-pretrain:{seed}:{i}")
        scene = make_scene(rng, cfg)
        images.append(render_scene(scene, rng, cfg))
        rows.append(patch_labels(scene, cfg, grid, min_cover))
    out = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
    out["pixel_values"] = preprocess(processor, images)
    return out


def preprocess(processor, images: list) -> torch.Tensor:
    """``processor(images)``; scenes already at the tower's size take a vectorised path (rescale and normalise
    only), checked against the processor on the first images, else every image goes through the processor."""
    head = processor(images=images[:8], return_tensors="pt")["pixel_values"]
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    mean, std = (np.asarray(v, dtype=np.float32) for v in (processor.image_mean, processor.image_std))
    fast = torch.from_numpy(((arr * processor.rescale_factor - mean) / std).transpose(0, 3, 1, 2).copy())
    if fast.shape[1:] == head.shape[1:] and torch.allclose(fast[:8], head, atol=1e-4):
        return fast
    return processor(images=images, return_tensors="pt")["pixel_values"]


class DenseHeads(nn.Module):
    """Linear read-outs of the patch features (thrown away after pretraining)."""

    def __init__(self, hidden: int, cfg: SynthConfig, grid: int) -> None:
        super().__init__()
        sizes = {"shape": len(cfg.shapes) + 1, "colour": len(cfg.colours) + 1, "size": len(cfg.sizes) + 1,
                 "row": grid, "col": grid}
        self.classify = nn.ModuleDict({k: nn.Linear(hidden, v) for k, v in sizes.items()})
        self.box = nn.Linear(hidden, 4)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**{k: head(feats) for k, head in self.classify.items()}, "box": self.box(feats)}


def _targets(batch: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    b = batch["shape"].shape[0]
    idx = torch.arange(grid * grid)
    return {**{k: batch[k] for k in ("shape", "colour", "size")},
            "row": (idx // grid).expand(b, -1), "col": (idx % grid).expand(b, -1)}


def dense_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], grid: int) -> torch.Tensor:
    loss = sum(F.cross_entropy(out[k].flatten(0, 1), t.flatten()) for k, t in _targets(batch, grid).items())
    on = batch["on_object"]
    if on.any():
        loss = loss + 10 * F.smooth_l1_loss(out["box"][on], batch["box"][on], beta=0.05)
    return loss


@torch.no_grad()
def dense_metrics(model, heads: DenseHeads, data: dict[str, torch.Tensor], layer: int, grid: int) -> dict[str, float]:
    """Held-out patch accuracy of each read-out (object patches only for shape/colour/size) and box L1 in pixels."""
    feats = patch_features(model, data["pixel_values"], layer)
    out = heads(feats)
    on = data["on_object"]
    metrics = {}
    for k, t in _targets(data, grid).items():
        right = (out[k].argmax(-1) == t).float()
        metrics[f"{k}_acc"] = float(right[on].mean() if k in ("shape", "colour", "size") else right.mean())
    metrics["background_acc"] = float((out["shape"].argmax(-1)[~on] == 0).float().mean())
    side = data["pixel_values"].shape[-1]
    metrics["box_l1_px"] = float((out["box"][on] - data["box"][on]).abs().mean() * side)
    return metrics


def patch_features(model, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """What LLaVA's ``CLIPVisionTower`` feeds its projector: ``hidden_states[layer]`` without the CLS token."""
    return model(pixel_values, output_hidden_states=True).hidden_states[layer][:, 1:]


def pretrain_tower(tower: str | Path, cfg: SynthConfig, spec: VisionPretrainSpec, seed: int = 0,
                   select_layer: int = -2) -> dict[str, float]:
    """Train ``tower`` (a saved ``CLIPVisionModel`` folder) in place; return held-out metrics before and after."""
    tower = Path(tower)
    if not (tower / "config.json").is_file():
        raise ValueError(f"{tower}: not a saved CLIPVisionModel folder (no config.json)")
    torch.manual_seed(seed)
    model = CLIPVisionModel.from_pretrained(str(tower))
    processor = CLIPImageProcessor.from_pretrained(str(tower))
    side, patch = model.config.image_size, model.config.patch_size
    if (cfg.width, cfg.height) != (side, side):
        raise ValueError(f"{tower}: the tower reads {side}x{side} images, the scenes are {cfg.width}x{cfg.height}")
    grid = side // patch
    train = render_set(cfg, processor, grid, spec.scenes, f"{seed}:train", spec.min_cover, "vision data")
    held = render_set(cfg, processor, grid, spec.eval_scenes, f"{seed}:held", spec.min_cover, "vision held-out")
    heads = DenseHeads(model.config.hidden_size, cfg, grid)
    before = dense_metrics(model, heads, held, select_layer, grid)
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(spec.steps), desc="vision pretrain", unit="step", file=sys.stderr, mininterval=2.0)
    for _ in bar:
        idx = torch.randint(spec.scenes, (spec.batch,), generator=gen)
        batch = {k: v[idx] for k, v in train.items()}
        loss = dense_loss(heads(patch_features(model, batch["pixel_values"], select_layer)), batch, grid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    after = dense_metrics(model, heads, held, select_layer, grid)
    model.save_pretrained(str(tower), safe_serialization=True)
    result = {"seconds": round(time.perf_counter() - start, 1), "spec": asdict(spec), "select_layer": select_layer,
              "before": before, "after": after}
    atomic_write_text(str(tower / "dense_pretraining.json"), json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m playground.miniature.vision_pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tower", required=True, help="a saved CLIPVisionModel folder (trained in place)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--select-layer", type=int, default=-2, help="the layer LLaVA reads (mm_vision_select_layer)")
    add_spec_arguments(p, VisionPretrainSpec())
    add_arguments(p)
    args = p.parse_args(argv)
    spec = spec_from_args(VisionPretrainSpec, args)
    try:
        cfg = config_from_args(args)
        result = pretrain_tower(args.tower, cfg, spec, args.seed, args.select_layer)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    a = result["after"]
    print(f"vision tower pretrained in {result['seconds']} s: held-out patch accuracy shape {a['shape_acc']:.3f}, "
          f"colour {a['colour_acc']:.3f}, size {a['size_acc']:.3f}, row {a['row_acc']:.3f}, col {a['col_acc']:.3f}, "
          f"background {a['background_acc']:.3f}; box L1 {a['box_l1_px']:.2f} px -> {args.tower}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

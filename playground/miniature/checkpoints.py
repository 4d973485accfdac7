"""What the miniature reads from a checkpoint folder: its weight files, their parameter counts, its tower."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def tensor_numel(path: Path, keep: Any = None) -> int:
    """Parameters stored in a ``.safetensors`` or torch ``.bin`` file (names filtered by ``keep``)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if keep is None or keep(k))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return sum(t.numel() for k, t in state.items() if keep is None or keep(k))


def checkpoint_weights(folder: Path) -> list[Path]:
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not found:
        raise FileNotFoundError(f"{folder}: no model weights (*.safetensors or pytorch_model*.bin)")
    return found


def language_model_params(folder: Path) -> int:
    """What LLaVA's full fine-tuning trains: every weight of the checkpoint but the (frozen) vision tower."""
    return sum(tensor_numel(p, lambda k: ".vision_tower." not in k) for p in checkpoint_weights(folder))


def vision_tower_of(model_dir: Path) -> str:
    return str(json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["mm_vision_tower"])

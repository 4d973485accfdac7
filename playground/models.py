"""Which model the playground opens: ``--model-path`` (+ ``--model-base``), else the model ``make demo`` trained
(its pointer, with held-out scenes of its world), else a tiny random LLaVA-1.5 built on first use."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from llava_twist.serve.loading import LoadedModel
from playground.pointer import PointerError, read_pointer

PLAYGROUND_DIR = Path(__file__).resolve().parent
DATA_DIR = PLAYGROUND_DIR / "data"
DEMO_DIR = DATA_DIR / "demo"
TINY_DIR = DATA_DIR / "tiny-llava"
TINY_DONE = "tiny_llava_spec.json"  # written last by build_tiny_llava


class PlaygroundError(Exception):
    """A problem the user can fix, shown in the UI."""


@dataclass
class ModelSource:
    model_path: str
    model_base: str | None
    label: str  # what the UI says is loaded
    examples: str | None = None  # example scenes of the model's own world (a folder with examples.json)


def ensure_tiny_model(out_dir: str | Path = TINY_DIR) -> Path:
    """The tiny random LLaVA-1.5 checkpoint in ``out_dir``, built on first use (a few seconds, no download)."""
    from llava_twist.tiny import build_tiny_llava

    out = Path(out_dir)
    if (out / TINY_DONE).is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    return build_tiny_llava(out)


def find_demo_model(demo_dir: str | Path = DEMO_DIR) -> ModelSource | None:
    """The model ``make demo`` trained, named by its pointer (:mod:`playground.pointer`); None when there
    is none."""
    try:
        pointer = read_pointer(demo_dir)
    except PointerError as exc:
        raise PlaygroundError(str(exc)) from exc
    if pointer is None:
        return None
    return ModelSource(pointer.model_path, pointer.model_base, pointer.label, pointer.examples)


def resolve_model_source(
    model_path: str | None = None,
    model_base: str | None = None,
    demo_dir: str | Path = DEMO_DIR,
    tiny_dir: str | Path = TINY_DIR,
) -> ModelSource:
    """``--model-path`` (+ ``--model-base``) when given, else the demo's trained model, else the tiny one."""
    if model_path:
        return ModelSource(model_path, model_base, _checkpoint_label(model_path, model_base))
    if model_base:
        raise PlaygroundError("--model-base needs --model-path (the TWIST delta to apply onto it)")
    demo = find_demo_model(demo_dir)
    if demo is not None:
        return demo
    tiny = ensure_tiny_model(tiny_dir)
    return ModelSource(
        str(tiny), None, f"the tiny demo LLaVA-1.5 with random weights ({tiny}); its answers are noise"
    )


def _checkpoint_label(model_path: str, model_base: str | None) -> str:
    from llava_twist.model.builder import is_twist_delta
    from llava_twist.model.checks import read_config_json
    from llava_twist.model.config import TWIST_MODEL_TYPE

    if model_base and is_twist_delta(model_path):
        return f"the TWIST grounding delta {model_path} on the base {model_base}"
    try:
        model_type = read_config_json(model_path).get("model_type")
    except (OSError, ValueError):
        return model_path
    if model_type == TWIST_MODEL_TYPE:
        return f"the TWIST checkpoint {model_path}"
    return (
        f"the LLaVA-1.5 checkpoint {model_path}, converted to TWIST on the fly (untrained grounding experts and "
        "router: Auto sends every prompt to the original model)"
    )


def describe_model(source: ModelSource, loaded: LoadedModel | None) -> str:
    """Markdown: what is loaded, with its TWIST settings."""
    lines = [f"**Model:** {source.label}"]
    if loaded is not None:
        cfg = loaded.model.config
        params = sum(p.numel() for p in loaded.model.parameters())
        twist = ", ".join(
            f"{k.removeprefix('twist_')}={getattr(cfg, k)}"
            for k in ("twist_expert", "twist_layers", "twist_mix", "twist_head", "twist_router_layer",
                      "twist_router_threshold")
            if hasattr(cfg, k)
        )
        dtype = str(loaded.dtype).split(".")[-1]
        lines.append(
            f"`{loaded.model_name}` · {params / 1e6:.2f}M parameters · {loaded.device} {dtype}"
            f" · TWIST: {twist or 'n/a'} · boxes in the `{loaded.default_box_frame()}` frame, drawn in original pixels"
        )
    return "  \n".join(lines)

"""The playground pointer: which trained model ``make playground`` opens, written by the demo's report.

``playground.json`` in the demo's folder: ``{"model_path": ..., "model_base": ... or null, "label": ...,
"examples": ... or null}`` (``examples``: a folder of example scenes from the model's own world), paths relative
to the file, so a moved demo folder still points at its own models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from scout_data.output import atomic_write_text

POINTER_FILE = "playground.json"


class PointerError(ValueError):
    """A pointer file that cannot be read."""


@dataclass(frozen=True)
class ModelPointer:
    model_path: str  # absolute
    model_base: str | None  # absolute, or None for a full checkpoint
    label: str
    examples: str | None = None  # absolute folder holding examples.json, or None


def write_pointer(folder: str | os.PathLike, model_path: str | os.PathLike, model_base: str | os.PathLike | None,
                  label: str, examples: str | os.PathLike | None = None) -> dict[str, str | None]:
    """Write ``folder/playground.json`` naming the model (stored relative to ``folder``); returns what it wrote."""
    path = Path(folder) / POINTER_FILE
    spec = {
        "model_path": os.path.relpath(model_path, folder),
        "model_base": os.path.relpath(model_base, folder) if model_base is not None else None,
        "label": label,
        "examples": os.path.relpath(examples, folder) if examples is not None else None,
    }
    atomic_write_text(path, json.dumps(spec, indent=2) + "\n")
    return spec


def read_pointer(folder: str | os.PathLike) -> ModelPointer | None:
    """The model ``folder/playground.json`` names, with absolute paths; None when there is no pointer."""
    path = Path(folder) / POINTER_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
        model_path = str((path.parent / spec["model_path"]).resolve())
        base, examples = spec.get("model_base"), spec.get("examples")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise PointerError(f"{path}: expected {{'model_path': ..., 'model_base': ...}} ({exc})") from exc
    model_base = str((path.parent / base).resolve()) if base else None
    return ModelPointer(model_path, model_base, spec.get("label") or f"the demo's trained TWIST model ({model_path})",
                        str((path.parent / examples).resolve()) if examples else None)

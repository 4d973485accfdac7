"""Fail early, and say how to fix it, when the `llava` package (LLaVA-1.5) is missing."""

from __future__ import annotations

import importlib.util
import os

LLAVA_INSTALL_HINT = (
    "llava-twist needs the LLaVA codebase (import name `llava`), which is not installed.\n"
    "Install it without its stale pins (torch 2.0.1, transformers 4.36.2, ...), which would break this environment:\n"
    "    pip install --no-deps llava-torch==1.2.2.post1\n"
    "(or run `make install`, which does this for you). The PyPI package named `llava` is an unrelated placeholder."
)


def require_llava() -> None:
    """Looks for ``llava/model`` without importing ``llava`` (whose ``__init__`` loads torch and transformers),
    so that the light modules (answer parsing, scoring rules) stay light."""
    try:
        spec = importlib.util.find_spec("llava")
    except (ImportError, ValueError):
        spec = None
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    if not any(os.path.isdir(os.path.join(location, "model")) for location in locations):
        raise ImportError(LLAVA_INSTALL_HINT)

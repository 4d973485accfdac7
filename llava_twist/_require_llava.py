"""Fail early, and say how to fix it, when the `llava` package (LLaVA-1.5) is missing."""

from __future__ import annotations

import importlib.util

LLAVA_INSTALL_HINT = (
    "llava-twist needs the LLaVA codebase (import name `llava`), which is not installed.\n"
    "Install it without its stale pins (torch 2.0.1, transformers 4.36.2, ...), which would break this environment:\n"
    "    pip install --no-deps llava-torch==1.2.2.post1\n"
    "(or run `make install`, which does this for you). The PyPI package named `llava` is an unrelated placeholder."
)


def require_llava() -> None:
    try:
        found = importlib.util.find_spec("llava") is not None and importlib.util.find_spec("llava.model") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(LLAVA_INSTALL_HINT)

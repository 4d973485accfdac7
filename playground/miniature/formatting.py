"""How the miniature's reports and cards write a figure."""

from __future__ import annotations

from typing import Any

LABELS = {"base": "base (LLaVA-1.5)", "full-ft": "full FT", "lora": "LoRA", "twist": "TWIST"}


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def dig(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, or None where a level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def label(name: str) -> str:
    return LABELS.get(name) or f"TWIST ({name.removeprefix('twist-')})"

"""Two models compared on the same questions: the paired difference of their right/wrong answers.

``paired_difference(a, b)`` gives accuracy ``a - b`` with a 95% percentile bootstrap interval over questions
(``scipy.stats.bootstrap`` of the per-question differences, which resamples questions with both models' answers
together) and the exact McNemar test (``scipy.stats.binomtest`` on the discordant pairs: questions one model got
right and the other wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p: ``only_a`` questions right for ``a`` alone, ``only_b`` for ``b`` alone."""
    from scipy.stats import binomtest

    discordant = only_a + only_b
    return 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)


def paired_difference(a: Sequence[bool], b: Sequence[bool], *, seed: int = 0, resamples: int = RESAMPLES,
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``a`` and ``b``: whether each model was right on the same questions, in the same order."""
    from scipy.stats import bootstrap

    if len(a) != len(b):
        raise ValueError(f"paired answers must cover the same questions: {len(a)} against {len(b)}")
    if len(a) == 0:
        raise ValueError("no questions to compare")
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    diff = x.astype(float) - y.astype(float)
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    if np.all(diff == diff[0]):  # every resample is the same: the interval is the point
        low = high = float(diff[0])
    else:
        ci = bootstrap((diff,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
                       random_state=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {
        "n": len(diff),
        "acc_a": float(x.mean()),
        "acc_b": float(y.mean()),
        "difference": float(diff.mean()),
        "ci": [low, high],
        "confidence": confidence,
        "only_a": only_a,
        "only_b": only_b,
        "mcnemar_p": mcnemar_exact(only_a, only_b),
    }


def describe(result: dict[str, Any]) -> str:
    """``+7.7 points (95% CI +4.6..+11.0, McNemar p 2e-06, n 1200)``."""
    low, high = (100 * v for v in result["ci"])
    return (f"{100 * result['difference']:+.1f} points ({100 * result['confidence']:.0f}% CI {low:+.1f}..{high:+.1f}, "
            f"McNemar p {format_p(result['mcnemar_p'])}, n {result['n']})")


def format_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"

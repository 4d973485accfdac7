"""Replay mixing: SCOUT records plus LLaVA instruction records, every record tagged with its ``task``.

``ratio`` is *replay records per SCOUT record*: ``0.2`` with 10,000 SCOUT records adds 2,000 replay
records (1/6 of the mix). ``replay_fraction`` instead fixes the replay share of the mix
(``F`` -> ``n_replay = F / (1 - F) * n_scout``). Replay records are drawn without replacement; when more
are asked for than exist, whole passes repeat (ids of repeats get a ``#r<k>`` suffix). SCOUT records are
tagged ``grounding`` and replay records ``understanding`` unless they already carry a ``task``. Ids stay
unique (a clash gets a ``#<n>`` suffix) and the result is shuffled with ``seed``.

Image paths of the two inputs are usually relative to different folders; ``scout_image_prefix`` /
``replay_image_prefix`` are joined in front so one ``--image_folder`` serves both.
"""

from __future__ import annotations

import copy
import posixpath
import random
from typing import Any

from scout_data.limits import MAX_MIX_RECORDS
from scout_data.schema import GROUNDING_TASK, UNDERSTANDING_TASK


def replay_count(n_scout: int, ratio: float | None = None, replay_fraction: float | None = None) -> int:
    """Replay records to draw for ``n_scout`` SCOUT records; the whole mix may hold at most ``MAX_MIX_RECORDS``."""
    if (ratio is None) == (replay_fraction is None):
        raise ValueError("give exactly one of ratio (replay per SCOUT record) and replay_fraction")
    if ratio is not None:
        if not 0 <= ratio < float("inf"):
            raise ValueError(f"--ratio {ratio}: must be a finite number >= 0")
        n, asked = ratio * n_scout, f"--ratio {ratio}"
    else:
        assert replay_fraction is not None
        if not 0 <= replay_fraction < 1:
            raise ValueError(f"--replay-fraction {replay_fraction}: must be in [0, 1)")
        n, asked = replay_fraction / (1 - replay_fraction) * n_scout, f"--replay-fraction {replay_fraction}"
    if n_scout + n > MAX_MIX_RECORDS:
        raise ValueError(f"{asked} with {n_scout} SCOUT records asks for a mix of {n_scout + n:.0f} records; "
                         f"the limit is {MAX_MIX_RECORDS}")
    return int(round(n))


def _tagged(rec: dict[str, Any], task: str, prefix: str) -> dict[str, Any]:
    rec = copy.copy(rec)
    rec.setdefault("task", task)
    if prefix and isinstance(rec.get("image"), str):
        rec["image"] = posixpath.join(prefix, rec["image"])
    return rec


def mix_records(
    scout: list[dict[str, Any]],
    replay: list[dict[str, Any]],
    *,
    ratio: float | None = None,
    replay_fraction: float | None = None,
    seed: int = 0,
    scout_image_prefix: str = "",
    replay_image_prefix: str = "",
) -> list[dict[str, Any]]:
    """The mixed, tagged, shuffled list (inputs are not modified)."""
    rng = random.Random(f"scout-mix:{seed}")
    n_replay = replay_count(len(scout), ratio, replay_fraction)
    if n_replay and not replay:
        raise ValueError("replay records requested but the replay input is empty")
    picked: list[dict[str, Any]] = []
    passes = 0
    while len(picked) < n_replay:
        order = list(range(len(replay)))
        rng.shuffle(order)
        for i in order[: n_replay - len(picked)]:
            rec = _tagged(replay[i], UNDERSTANDING_TASK, replay_image_prefix)
            if passes:
                rec["id"] = f"{rec.get('id')}#r{passes}"
            picked.append(rec)
        passes += 1
    out = [_tagged(r, GROUNDING_TASK, scout_image_prefix) for r in scout] + picked
    seen: set[str] = set()
    for rec in out:
        rid = str(rec.get("id"))
        if rid in seen:
            k = 2
            while f"{rid}#{k}" in seen:
                k += 1
            rid = f"{rid}#{k}"
            rec["id"] = rid
        seen.add(rid)
    rng.shuffle(out)
    return out

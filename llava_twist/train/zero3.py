"""LLaVA's DeepSpeed ZeRO-3 configs (``scripts/zero3.json``, ``scripts/zero3_offload.json``): the hidden-size based
``auto`` values, as transformers' integration resolves them, and the settings that decide memory.

Training (:func:`llava_twist.train.train_twist.fill_deepspeed_hidden_size_autos`) and the planner
(:mod:`llava_twist.plan`) both read the ``auto`` values from :func:`hidden_size_autos`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
ZERO3 = SCRIPTS / "zero3.json"
ZERO3_OFFLOAD = SCRIPTS / "zero3_offload.json"
OFFLOAD_DEVICES = ("cpu", "nvme")
# DeepSpeed's defaults (deepspeed.runtime.zero.config) for the keys a config may leave out
DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 100_000, "stage3_max_live_parameters": 1_000_000_000}


def hidden_size_autos(hidden_size: int) -> dict[str, int]:
    """The ``zero_optimization`` keys transformers fills from the model's hidden size when they say ``auto``
    (``HfTrainerDeepSpeedConfig.trainer_config_finalize``), as integers: transformers 4.37.2 writes
    ``0.9 * hidden**2`` (a float), which DeepSpeed >= 0.15 rejects for ``stage3_prefetch_bucket_size``."""
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


class Zero3ConfigError(ValueError):
    """A DeepSpeed config the planner cannot read as ZeRO-3; the message is one line naming the file."""


@dataclass(frozen=True)
class Zero3Settings:
    """What a ZeRO-3 config says about memory, ``auto`` values resolved for a hidden size."""

    path: str
    offload_optimizer: bool
    offload_param: bool
    reduce_bucket_size: int
    prefetch_bucket_size: int
    param_persistence_threshold: int
    max_live_parameters: int


def _offloaded(zero: dict[str, Any], key: str) -> bool:
    section = zero.get(key) or {}
    return isinstance(section, dict) and section.get("device") in OFFLOAD_DEVICES


def read_zero3(path: str | os.PathLike, hidden_size: int) -> Zero3Settings:
    """A DeepSpeed config file's ZeRO-3 settings, or a :class:`Zero3ConfigError`."""
    try:
        config = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise Zero3ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise Zero3ConfigError(f"{path}: not a JSON DeepSpeed config ({e})") from None
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    if not isinstance(zero, dict) or zero.get("stage") != 3:
        raise Zero3ConfigError(f"{path}: not a ZeRO-3 config (zero_optimization.stage must be 3)")
    autos = hidden_size_autos(hidden_size)
    values = {}
    for key, default in DEFAULTS.items():
        value = zero.get(key, default)
        if value == "auto":
            value = autos.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise Zero3ConfigError(f"{path}: zero_optimization.{key} {value!r} is not a count")
        values[key] = int(value)
    return Zero3Settings(
        path=str(path),
        offload_optimizer=_offloaded(zero, "offload_optimizer"),
        offload_param=_offloaded(zero, "offload_param"),
        reduce_bucket_size=values["reduce_bucket_size"],
        prefetch_bucket_size=values["stage3_prefetch_bucket_size"],
        param_persistence_threshold=values["stage3_param_persistence_threshold"],
        max_live_parameters=values["stage3_max_live_parameters"],
    )

"""lmms-eval plugin: ``--model llava_twist`` and offline tasks (REC in lmms-eval's form, short-answer understanding).

lmms-eval (pinned: :data:`LMMS_EVAL`) finds the model through the entry-point group ``lmms_eval.models`` (declared in
``setup.py``, payload :func:`manifests`) and, with ``LMMS_EVAL_PLUGINS=llava_twist.lmms``, through this package's
``models`` (the model) and ``tasks`` (the task YAMLs, also usable with ``--include_path llava_twist/lmms/tasks``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

LMMS_EVAL = "lmms-eval==0.7.3"
MODEL_ID = "llava_twist"
MODEL_CLASS_PATH = "llava_twist.lmms.models.llava_twist.LlavaTwist"
INSTALL_HINT = (
    f"lmms-eval is not installed. Its release metadata asks for transformers>=4.39, which LLaVA-1.5 cannot run "
    f"on, so it is installed without its dependencies and ours pin what it needs: `make install` does it, or by "
    f"hand: pip install -e \".[lmms]\" && pip install --no-deps {LMMS_EVAL}"
)


def require_lmms_eval() -> None:
    """Fail with :data:`INSTALL_HINT` (naming the ``lmms`` extra) when lmms-eval is missing."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise ImportError(INSTALL_HINT)


def manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point's payload: one manifest, ``llava_twist`` -> :data:`MODEL_CLASS_PATH`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)]

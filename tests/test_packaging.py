"""What ``pip install .`` installs: the plugin (``llava_twist``, ``scout_data``) and the playground app, never the
miniature (``playground/miniature``, run from a checkout by ``make demo`` and ``make base``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_modules(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The Python modules of a wheel built from a copy of the sources (the checkout is not written to)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy2(REPO / "setup.py", src)
    ignore = shutil.ignore_patterns("__pycache__", "data", "models", "examples", "*.egg-info")
    for package in ("llava_twist", "scout_data", "playground"):
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, timeout=300, cwd=src)
    (wheel,) = out.glob("llava_twist-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return {n.removesuffix(".py").replace("/", ".") for n in z.namelist() if n.endswith(".py")}


def test_the_wheel_holds_the_plugin(wheel_modules: set[str]) -> None:
    for module in ("llava_twist.model.modeling", "llava_twist.train.train_twist", "llava_twist.eval.eval_refexp",
                   "llava_twist.serve.model_worker", "llava_twist.tiny", "scout_data.cli", "playground.app",
                   "playground.pointer"):
        assert module in wheel_modules


def test_the_wheel_holds_no_miniature_module(wheel_modules: set[str]) -> None:
    assert not [m for m in wheel_modules if m.startswith("playground.miniature") or ".demo" in m]

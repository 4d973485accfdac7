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
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a wheel built from a copy of the sources (the checkout is not written to): name -> content."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy2(REPO / "setup.py", src)
    ignore = shutil.ignore_patterns("__pycache__", "data", "examples", "*.egg-info")
    for package in ("llava_twist", "scout_data", "playground"):
        skip = shutil.ignore_patterns("models") if package == "playground" else None
        shutil.copytree(REPO / package, src / package,
                        ignore=lambda d, names, skip=skip: ignore(d, names) | (set(skip(d, names)) if skip else set()))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, timeout=300, cwd=src)
    (wheel,) = out.glob("llava_twist-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return {n: z.read(n) for n in z.namelist()}


@pytest.fixture(scope="module")
def wheel_modules(wheel_files: dict[str, bytes]) -> set[str]:
    return {n.removesuffix(".py").replace("/", ".") for n in wheel_files if n.endswith(".py")}


def test_the_wheel_holds_the_plugin(wheel_modules: set[str]) -> None:
    for module in ("llava_twist.model.modeling", "llava_twist.train.train_twist", "llava_twist.eval.eval_refexp",
                   "llava_twist.serve.model_worker", "llava_twist.tiny", "scout_data.cli", "playground.app",
                   "playground.pointer"):
        assert module in wheel_modules


def test_the_wheel_holds_the_lmms_eval_plugin(wheel_modules: set[str], wheel_files: dict[str, bytes]) -> None:
    """``--model llava_twist`` (its entry point and module) and the offline tasks' YAMLs."""
    assert "llava_twist.lmms.models.llava_twist" in wheel_modules
    tasks = "llava_twist/lmms/tasks/"
    assert {tasks + "twist_rec.yaml", tasks + "twist_understanding.yaml"} <= set(wheel_files)
    (entry_points,) = [content for name, content in wheel_files.items() if name.endswith(".dist-info/entry_points.txt")]
    assert "[lmms_eval.models]\nllava_twist = llava_twist.lmms:manifests" in entry_points.decode()


def test_the_wheel_holds_no_miniature_module(wheel_modules: set[str]) -> None:
    assert not [m for m in wheel_modules if m.startswith("playground.miniature") or ".demo" in m]

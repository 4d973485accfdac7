"""Shared fixtures: tiny LLaVA-1.5 checkpoints built locally (no hub), once per test session."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

# The environment the suite needs, set here so that `pytest`, `pytest tests/x.py::t` from any folder and
# `make test` run alike: a CPU suite (a GPU host's cards stay hidden), no hub, and DeepSpeed's CPU op loaded from
# the build `make install` made in the venv (the venv's tools first on PATH, as the launcher's children find them),
# never compiled again into ~/.cache.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under `pytest -n N --dist loadgroup` (make test), a file's tests run on one worker, so its module fixtures are built
# once; the demo's and the release's tests share one worker, and with it the session's ci demo (the release copies
# the demo's folder, which the demo's tests run again).
SHARED_WORKER = {"test_demo.py": "ci_demo", "test_release.py": "ci_demo"}


def pytest_itemcollected(item: pytest.Item) -> None:
    """A test that launches DeepSpeed or drives a browser is slow too: ``-m "not slow"`` is the quick part. Each
    test gets its file's worker group (``SHARED_WORKER``)."""
    if item.get_closest_marker("deepspeed") or item.get_closest_marker("browser"):
        item.add_marker(pytest.mark.slow)
    item.add_marker(pytest.mark.xdist_group(SHARED_WORKER.get(item.path.name, item.path.name)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ci demo's group first: the longest (about 4 minutes), so a second worker takes the rest meanwhile."""
    items.sort(key=lambda item: SHARED_WORKER.get(item.path.name) != "ci_demo")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llava_twist.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava") / "llava-v1.5-tiny")


@pytest.fixture(scope="session")
def other_tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shapes as `tiny_llava`, other weights: the wrong base for a delta."""
    from llava_twist.tiny import TinyLlavaSpec, build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("other-llava") / "llava-v1.5-tiny", TinyLlavaSpec(seed=1))


@pytest.fixture()
def seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def load_script():
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def ci_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``python -m playground.miniature --profile ci`` run once per session (the demo's tests read it; the release's
    tests build their base from a copy of its cached stages): its folder, the finished process, its seconds, and
    ``run(out)`` to run the same command again."""
    out = tmp_path_factory.mktemp("ci-demo") / "demo"
    start = time.perf_counter()
    proc = run_ci_demo(out)
    return {"out": out, "proc": proc, "seconds": time.perf_counter() - start, "run": run_ci_demo}


def run_ci_demo(out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "playground.miniature", "--profile", "ci", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc

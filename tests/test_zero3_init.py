"""Grounding experts are copied correctly under ZeRO-3 (partitioned parameters, 2 CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from deepspeed_shm import free_port, shm_buffers  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

HELPER = Path(__file__).parent / "helpers" / "zero3_init_check.py"


def test_experts_copied_under_zero3(tiny_llava: Path, tmp_path: Path) -> None:
    out = tmp_path / "result"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(HELPER), "--model", str(tiny_llava), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    finally:
        for buffer in shm_buffers(port):
            buffer.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for expert in ("mlp", "layer"):
        assert all(r[expert]["partitioned"] for r in results), results
        assert all(r[expert]["copies_equal"] for r in results), results

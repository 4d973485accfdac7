"""What every bad-input test checks of a command's refusal (imported by the tests, not collected)."""

from __future__ import annotations

import subprocess


def assert_one_line(proc: subprocess.CompletedProcess[str], *pieces: str) -> str:
    """Exit status 2 and a single stderr line holding each of ``pieces``, no traceback; returns the line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for piece in pieces:
        assert piece in lines[0], lines[0]
    return lines[0]

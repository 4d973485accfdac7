"""How the tests run a command and check its refusal (imported by the tests, not collected)."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python -m PACKAGE` runs the package's __main__, which calls this module's main
ENTRY_POINTS = {"scout_data": "scout_data.cli"}


def run_module(argv: Sequence[str | os.PathLike], *, cwd: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m argv[0] argv[1:]``, run in this process through the module's ``main(argv)``: the exit status,
    stdout and stderr as the command line gives them (a ``sys.exit("text")`` prints its text and exits 1; an
    uncaught exception prints its traceback and exits 1). ``env`` is laid over ``os.environ`` for the call.

    Starting Python and importing torch costs seconds a command; the probes run hundreds of commands, so they run
    here. ``test_in_process_runs_match_real_processes`` holds this to what a real process prints."""
    module, *args = map(str, argv)
    main = importlib.import_module(ENTRY_POINTS.get(module, module)).main
    out, err = io.StringIO(), io.StringIO()
    with _environment(env), contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err), _console_as_a_new_process(err):
        try:
            status = main(args)
        except SystemExit as exc:
            status = exc.code
            if status is not None and not isinstance(status, int):
                print(status, file=sys.stderr)
                status = 1
        except Exception:  # noqa: BLE001 - reported as the interpreter would, for the test to see
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(["python", "-m", module, *args], int(status or 0), out.getvalue(),
                                       err.getvalue())


def run_process(argv: Sequence[str | os.PathLike], *, cwd: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m argv[0] argv[1:]`` as a real process (the package importable from this checkout)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", *map(str, argv)], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


@contextlib.contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _console_as_a_new_process(err: io.StringIO) -> Iterator[None]:
    """What a fresh interpreter prints to stderr besides ``print``: Python's default warning filters, the
    libraries' console log handlers, and logging's last resort for records no handler takes (pytest's own
    handlers on the root logger are set aside meanwhile)."""
    root = logging.getLogger()
    saved_root = root.handlers[:], root.level
    loggers = [root, *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    consoles = [h for x in loggers for h in x.handlers
                if type(h) is logging.StreamHandler]
    streams = [h.setStream(err) for h in consoles]
    root.handlers, root.level = [h for h in root.handlers if h in consoles], logging.WARNING
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        for handler, stream in zip(consoles, streams, strict=True):
            handler.setStream(stream)
        root.handlers, root.level = saved_root


def assert_one_line(proc: subprocess.CompletedProcess[str], *pieces: str) -> str:
    """Exit status 2 and a single stderr line holding each of ``pieces``, no traceback; returns the line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for piece in pieces:
        assert piece in lines[0], lines[0]
    return lines[0]

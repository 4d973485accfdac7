"""How the tests run a command and check its refusal (imported by the tests, not collected)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from transformers.utils import logging as transformers_logging

REPO = Path(__file__).resolve().parents[1]
# `python -m PACKAGE` runs the package's __main__, which calls this module's main
ENTRY_POINTS = {"scout_data": "scout_data.cli", "llava_twist.lmms.tasks": "llava_twist.lmms.tasks.__main__"}


def run_module(argv: Sequence[str | os.PathLike], *, cwd: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m argv[0] argv[1:]``, run in this process through the module's ``main(argv)``: the exit status,
    stdout and stderr as the command line gives them (a ``sys.exit("text")`` prints its text and exits 1; an
    uncaught exception prints its traceback and exits 1). ``env`` is laid over ``os.environ`` for the call.

    Starting Python and importing torch costs seconds a command; the probes run hundreds of commands, so they run
    here. ``test_in_process_runs_match_real_processes`` holds this to what a real process prints."""
    module, *args = map(str, argv)
    out, err = io.StringIO(), io.StringIO()
    with (_environment(env), _working_folder(cwd), _command_line(module, args), contextlib.redirect_stdout(out),
          contextlib.redirect_stderr(err), _console_as_a_new_process(err)):
        try:
            status = importlib.import_module(ENTRY_POINTS.get(module, module)).main(args)
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
def _working_folder(cwd: str | os.PathLike | None) -> Iterator[None]:
    saved = os.getcwd()
    os.chdir(cwd or saved)
    try:
        yield
    finally:
        os.chdir(saved)


@contextlib.contextmanager
def _command_line(module: str, args: list[str]) -> Iterator[None]:
    """``sys.argv`` as ``python -m`` sets it (commands record it: a run's summary, a lock's holder)."""
    saved = sys.argv
    spec = importlib.util.find_spec(module)
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        spec = importlib.util.find_spec(f"{module}.__main__")
    sys.argv = [spec.origin, *args]
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _console_as_a_new_process(err: io.StringIO) -> Iterator[None]:
    """What a fresh interpreter prints to stderr besides ``print``: warnings (Python's default filters, printed,
    not recorded by pytest), the libraries' console log handlers, each once-only warning of transformers again,
    and logging's last resort for records no handler takes (the root logger has no handler in a new process)."""
    root = logging.getLogger()
    saved_root = root.handlers[:], root.level
    loggers = [root, *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    consoles = list(dict.fromkeys(h for x in loggers for h in x.handlers if type(h) is logging.StreamHandler))
    streams = [h.setStream(err) for h in consoles]
    root.handlers, root.level = [], logging.WARNING
    transformers_logging.warning_once.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _print_warning
            yield
    finally:
        for handler, stream in zip(consoles, streams, strict=True):
            handler.setStream(stream)
        root.handlers, root.level = saved_root


def _print_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: TextIO | None = None, line: str | None = None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def assert_one_line(proc: subprocess.CompletedProcess[str], *pieces: str) -> str:
    """Exit status 2 and a single stderr line holding each of ``pieces``, no traceback; returns the line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for piece in pieces:
        assert piece in lines[0], lines[0]
    return lines[0]

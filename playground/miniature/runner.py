"""The stage runner of ``make demo`` and ``make base``: cache stamps, logs, subprocesses, progress.

Every stage owns a folder under ``--out`` and, when it finishes, writes ``<folder>/.done.json``: the hash of
the recipe part it reads plus the stamps of the stages it reads from, and its wall time. A rerun with the
same settings skips the stage ("cached"); changed settings (or ``--force STAGE``) redo it, which gives it
a new stamp, so every stage downstream is redone too. Code changes are not tracked, except for the cheap
stages that list their source files (evaluation scoring, the report): after changing a trainer or a data
generator, pass ``--force`` with the stage.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from playground.miniature.checkout import REPO
from playground.miniature.recipe import Recipe, config_hash
from playground.miniature.release import sha256_file
from scout_data.output import atomic_write_text

T = TypeVar("T")

# The same CPU kernels on every x86 machine with AVX2, so that a run's trainings and answers are the same there:
# PyTorch's own kernels, MKL's (its conditional numerical reproducibility) and oneDNN's, capped at AVX2. Without it
# an AVX-512 machine rounds some ops (GELU among them) otherwise than an AVX2 one, and trainings drift apart.
PORTABLE_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
STAMP = ".done.json"
STAMP_VERSION = 1
LOG_TAIL_LINES = 30


class StageError(RuntimeError):
    """A stage failed: names the stage and its log and quotes the log's last lines."""

    def __init__(self, stage: str, message: str, log: Path | None = None) -> None:
        text = f"stage {stage!r} failed: {message}"
        if log is not None:
            text += f"\nlog: {log}"
            tail = tail_lines(log, LOG_TAIL_LINES)
            if tail:
                text += f"\n--- last {LOG_TAIL_LINES} lines of the log ---\n{tail}"
        super().__init__(text)
        self.stage = stage
        self.log = log


def tail_lines(path: Path, n: int) -> str:
    """The last ``n`` lines of a text file (progress-bar carriage returns folded), or ''."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(line for line in lines[-n:])


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(str(path), json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class Layout:
    """Where everything goes under ``--out``."""

    out: Path

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def models(self) -> Path:
        return self.work / "models"

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def eval(self) -> Path:
        return self.work / "eval"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def model(self, name: str) -> Path:
        return self.models / name

    def log(self, stage: str) -> Path:
        return self.logs / f"{stage}.log"


@dataclass
class Context:
    """What a stage body gets: the recipe, the layout, the stamps of its upstream stages, a command runner."""

    recipe: Recipe
    layout: Layout
    stage: str
    folder: Path
    stamps: dict[str, dict[str, Any]]
    python: str = sys.executable

    @property
    def log(self) -> Path:
        return self.layout.log(self.stage)

    def note(self, text: str) -> None:
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(text.rstrip("\n") + "\n")

    def env(self, threads: int | None = None) -> dict[str, str]:
        """The environment of a subprocess: offline, ``threads`` OpenMP threads, this Python's bin first."""
        bin_dir = str(Path(self.python).parent)
        env = dict(os.environ)
        threads = threads or self.recipe.threads or cpu_count()
        env.update(
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            WANDB_DISABLED="true",
            PATH=bin_dir + os.pathsep + env.get("PATH", ""),
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),  # the miniature's tools
        )
        if self.recipe.device == "cpu":  # on a CUDA host, HF's Trainer and DeepSpeed would take the GPU
            env["CUDA_VISIBLE_DEVICES"] = ""
            for name, value in PORTABLE_CPU_KERNELS.items():
                env.setdefault(name, value)
        return env

    def run(self, cmd: Sequence[str], *, threads: int | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> None:
        """Run ``cmd`` with its output appended to the stage log; a non-zero exit is a :class:`StageError`."""
        full_env = self.env(threads)
        full_env.update(env or {})
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        self.note(f"$ {shown + ' ' if shown else ''}{shlex.join(cmd)}")
        with open(self.log, "a", encoding="utf-8") as f:
            try:
                proc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                      cwd=str(cwd or self.folder), check=False)
            except OSError as exc:
                raise StageError(self.stage, f"cannot run {cmd[0]}: {exc}", self.log) from exc
        if proc.returncode != 0:
            raise StageError(self.stage, f"`{shlex.join(cmd[:4])} ...` exited with status {proc.returncode}",
                             self.log)

    def python_module(self, module: str, *args: str, threads: int | None = None) -> None:
        self.run([self.python, "-m", module, *args], threads=threads)


StageBody = Callable[[Context], dict[str, Any] | None]


@dataclass
class Stage:
    """A step of the pipeline: its folder, the stages it reads from, its body, and the slice of the recipe it reads
    (``config``: what its cache stamp hashes, so that a change elsewhere in the recipe keeps it cached)."""

    name: str
    folder: Callable[[Layout], Path]
    deps: tuple[str, ...]
    body: StageBody
    config: Callable[[Recipe], dict[str, Any]]
    clean: bool = True  # empty the folder before a rerun (eval keeps its per-model answers cache)
    code: tuple[Path, ...] = ()  # files whose content is part of the stamp (sources of cheap stages, weights)


@dataclass
class StageResult:
    name: str
    cached: bool
    seconds: float
    stamp: dict[str, Any] = field(default_factory=dict)


def file_digest(path: Path) -> str:
    """A file's content hash (an absent file hashes as absent: the stage then fails and says why)."""
    return sha256_file(path)[:16] if path.is_file() else "absent"


def stage_hash(recipe: Recipe, stage: Stage, stamps: dict[str, dict[str, Any]]) -> str:
    return config_hash({
        "version": STAMP_VERSION,
        "config": stage.config(recipe),
        "upstream": {d: stamps[d]["id"] for d in stage.deps},
        "code": [file_digest(p) for p in stage.code],
    })


def read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        stamp = read_json(folder / STAMP)
    except (OSError, json.JSONDecodeError):
        return None
    return stamp if isinstance(stamp, dict) and {"hash", "id"} <= set(stamp) else None


def run_stage(stage: Stage, recipe: Recipe, layout: Layout, stamps: dict[str, dict[str, Any]],
              force: bool = False) -> StageResult:
    """Run ``stage`` unless its stamp matches; returns whether it was cached, and its stamp."""
    folder = stage.folder(layout)
    digest = stage_hash(recipe, stage, stamps)
    old = read_stamp(folder)
    if old is not None and old["hash"] == digest and not force:
        return StageResult(stage.name, True, float(old.get("seconds", 0.0)), old)
    if (stage.clean or force) and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).unlink(missing_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    log = layout.log(stage.name)
    log.write_text(f"# stage {stage.name} ({recipe.profile} profile) started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    ctx = Context(recipe, layout, stage.name, folder, stamps)
    start = time.perf_counter()
    try:
        info = stage.body(ctx) or {}
    except StageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a stage body is reported the same way
        ctx.note(f"{type(exc).__name__}: {exc}")
        raise StageError(stage.name, f"{type(exc).__name__}: {exc}", log) from exc
    seconds = time.perf_counter() - start
    finished = time.strftime("%Y-%m-%dT%H:%M:%S")
    stamp = {
        "stage": stage.name,
        "hash": digest,
        "id": config_hash([digest, finished, time.time_ns()]),
        "config": stage.config(recipe),
        "upstream": {d: stamps[d]["id"] for d in stage.deps},
        "seconds": round(seconds, 3),
        "finished": finished,
        "profile": recipe.profile,
        "info": info,
    }
    write_json(folder / STAMP, stamp)
    ctx.note(f"# done in {seconds:.1f} s")
    return StageResult(stage.name, False, seconds, stamp)


def run_stages(stages: Sequence[Stage], recipe: Recipe, out: str | Path, force: Sequence[str] = (),
               progress: bool | None = None, echo: bool = True) -> list[StageResult]:
    """Run (or reuse) ``stages`` in order into ``out`` with a progress bar and one line per stage; ``force`` names
    stages to redo (or ``all``)."""
    layout = Layout(Path(out).resolve())
    names = [s.name for s in stages]
    unknown = sorted(set(force) - {*names, "all"})
    if unknown:
        raise ValueError(f"--force {', '.join(unknown)}: no such stage; stages are {', '.join(names)}")
    layout.out.mkdir(parents=True, exist_ok=True)
    stamps: dict[str, dict[str, Any]] = {}
    results: list[StageResult] = []
    bar = tqdm(total=len(stages), desc=f"demo ({recipe.profile})", unit="stage", file=sys.stderr,
               disable=(not progress) if progress is not None else None, dynamic_ncols=True)
    try:
        for stage in stages:
            bar.set_postfix_str(stage.name)
            result = run_stage(stage, recipe, layout, stamps, force="all" in force or stage.name in force)
            stamps[stage.name] = result.stamp
            results.append(result)
            line = f"[{stage.name}] cached" if result.cached else f"[{stage.name}] done in {result.seconds:.1f} s"
            if echo:
                bar.write(line, file=sys.stdout)
            bar.update(1)
    finally:
        bar.close()
    return results


def run_guarded(body: Callable[[], T]) -> tuple[T | None, int]:
    """``body()`` and exit status 0; a failed stage is one line on stderr (status 1), a bad setting too (status 2),
    an interrupt says how to go on (130)."""
    try:
        return body(), 0
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt:
        print("interrupted; run again to continue (finished stages are cached)", file=sys.stderr)
        return None, 130

"""Write samples as LLaVA JSON: one file per split, sharded while running, resumable, atomic.

Layout of an output folder ``DIR``::

    DIR/train.json, DIR/val.json, DIR/test.json   one JSON list per split (what LLaVA's --data_path reads)
    DIR/shards/<split>-00000.json                  shards written every --shard-size records of a split;
                                                   merged into DIR/<split>.json and removed at the end
    DIR/images/                                    rendered images (synthetic source only)
    DIR/summary.json                               records per split, skips per reason, the image folder

    DIR/.scout-run.json                            what made the folder: the command's settings, its splits

``resume=True`` reads the ids already in the folder's own split files and shards and skips them; it is
refused unless ``.scout-run.json`` says this command made the folder with the same settings (so another
seed, or a folder of the user's, is never mixed in or rewritten). Without it a non-empty ``DIR`` is refused.
A resumed run ends with the same records as a fresh one (records written before the interruption come first).
Every file is written to a temp file and moved into place; only the folder's own split files are touched.

One writer at a time: a command holds :func:`output_lock` on its output (a folder or a file) while it writes, an
``fcntl.flock`` on ``.<name>.lock`` beside it that the kernel releases when the process ends, even by SIGKILL. A
second writer is refused. The holder removes the temporaries (``.<name>.tmp<pid>``) a killed writer left.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

from scout_data.boxes import DEFAULT_FRAME
from scout_data.schema import Sample, Skip
from scout_data.validate import DataError, ImageChecker, load_json, record_problems
from scout_data.writer import render_record

SUMMARY = "summary.json"
SHARDS = "shards"
RUN_FILE = ".scout-run.json"
MAX_EXAMPLES = 5
LOCK_SUFFIX = ".lock"
TEMP_RE = re.compile(r"^\.?(?P<name>.+)\.tmp(?P<pid>\d+)$")  # atomic_write's ``.<name>.tmp<pid>`` (older: no dot)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # the image files a command writes, by suffix


class OutputError(Exception):
    """The output folder cannot be used as asked (e.g. not empty without ``--resume``)."""


def check_output(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
    flag: str = "--out", made_here: Callable[[str], bool] | None = None,
    inside: Iterable[str | os.PathLike | None] = (),
) -> None:
    """The one rule for every command that writes: never over one of its own inputs (symlinks followed); never
    over an existing file, or into a non-empty folder, unless ``overwrite`` or ``made_here(path)`` says this
    command wrote it (a rerun replaces its own output); never inside one of the folders ``inside`` (a model it
    reads). Raises :class:`OutputError` naming the flag."""
    target = os.path.realpath(path)
    for given in inputs:
        if given is not None and os.path.realpath(given) == target:
            raise OutputError(f"{flag} {path} is one of this command's inputs ({given}); inputs are never overwritten")
    for folder in inside:
        if folder is not None and os.path.isdir(folder):
            root = os.path.realpath(folder)
            if os.path.commonpath([root, target]) == root:
                raise OutputError(f"{flag} {path} is inside {folder}, which this command reads; write elsewhere")
    taken = os.path.isfile(path) or (os.path.isdir(path) and any(os.scandir(path)))
    if taken and not overwrite and not (made_here is not None and made_here(str(path))):
        raise OutputError(f"{flag} {path} exists and this command did not make it; pass --overwrite to replace it")


def image_format(path: str | os.PathLike, flag: str = "--out") -> str:
    """The Pillow format an image output's suffix names (``.jpg`` -> JPEG); other suffixes are refused."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in IMAGE_FORMATS:
        raise OutputError(f"{flag} {path}: use a file name ending in {', '.join(IMAGE_FORMATS)} (the suffix names "
                          "the image format written)")
    return IMAGE_FORMATS[suffix]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _stale(name: str, stem: str | None = None) -> bool:
    """Whether ``name`` is a temporary of :func:`atomic_write` (of ``stem``, when given) whose writer is dead."""
    m = TEMP_RE.match(name)
    if m is None or (stem is not None and m["name"] != stem):
        return False
    pid = int(m["pid"])
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temporaries(path: str | os.PathLike, tree: bool = False) -> list[str]:
    """Remove the temporaries a killed writer of output ``path`` left: ``.<name>.tmp<pid>`` beside it and, with
    ``tree`` (a folder this command made, held by :func:`output_lock`), every ``<file>.tmp<pid>`` inside it.
    Only files of that pattern whose process is gone; symlinks are not followed. Returns the paths removed."""
    path = os.path.abspath(path)
    removed = []
    folder, stem = os.path.split(path)
    candidates = [os.path.join(folder, e.name) for e in _scandir(folder) if _stale(e.name, stem) and e.is_file()]
    if tree and os.path.isdir(path) and not os.path.islink(path):
        for root, _dirs, names in os.walk(path):
            candidates += [os.path.join(root, n) for n in names if _stale(n)]
    for tmp in candidates:
        if not os.path.islink(tmp):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
                removed.append(tmp)
    return removed


def _scandir(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, flag: str = "--out") -> Iterator[str]:
    """Hold output ``path`` (a file or a folder) for this process while the block runs: an exclusive
    ``fcntl.flock`` on ``.<name>.lock`` beside it, which records the holder's pid and command. A second writer
    gets :class:`OutputError` naming ``path`` and the holder. The kernel releases the lock when the process ends
    (SIGKILL too); a lock file left behind is free and taken over. Once held, stale temporaries beside ``path``
    are removed. Folders it made for ``path`` are removed again when they end up empty (a refused run leaves
    nothing). Yields the lock file's path."""
    target = os.path.realpath(path)  # two names of one output share its lock
    folder, name = os.path.split(target)
    lock = os.path.join(folder, f".{name}{LOCK_SUFFIX}")
    made, parent = [], folder
    while parent and not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot create its folder {folder}: {exc.strerror or exc}") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"{flag} {path}: cannot create the lock file {lock}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{flag} {path} is being written by another run ({holder}); wait for it to end or "
                              f"choose another {flag}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a file the previous holder just removed
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        argv = getattr(sys, "orig_argv", None) or sys.argv
        command = " ".join([os.path.basename(argv[0] or "python"), *argv[1:]])[:300]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command}\n".encode(), 0)
        remove_stale_temporaries(target)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)  # while still held: a waiter that opened it sees another inode and retries
        os.close(fd)
        for made_folder in made:  # deepest first; a folder something was written into stays
            with contextlib.suppress(OSError):
                os.rmdir(made_folder)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temp file beside ``path`` (``.<name>.tmp<pid>``), then move it into place; on failure
    nothing is left."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def replace_folder(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a new folder beside ``path``, which then replaces ``path`` whole: an ``--overwrite``
    replaces, never merges (nothing of the old folder survives), and a failed or killed write leaves the old one
    (a run killed between the two renames leaves it aside, and the next run puts it back before it starts)."""
    target = os.path.abspath(path)
    parent, name = os.path.dirname(target), os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    for entry in _scandir(parent):  # what a killed run left: its half-written folder, or the old one set aside
        if entry.is_dir(follow_symlinks=False) and _stale(entry.name, f"{name}.old"):
            if os.path.lexists(target):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.rename(entry.path, target)
        elif entry.is_dir(follow_symlinks=False) and _stale(entry.name, name):
            shutil.rmtree(entry.path, ignore_errors=True)
    tmp = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    old = os.path.join(parent, f".{name}.old.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if os.path.lexists(target):
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if os.path.lexists(old):
                os.rename(old, target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    elif os.path.lexists(old):
        os.unlink(old)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def dumps_records(records: Iterable[dict[str, Any]]) -> str:
    """A JSON list with one record per line (diffable, and byte-identical for identical records)."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    return "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"


def atomic_write_records(path: str, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, dumps_records(records))


def describe_differences(had: Any, want: dict[str, Any]) -> str:
    """``"seed was 0, now 1; ..."`` for the settings in which ``had`` (what made an output) and ``want`` differ;
    empty when they agree. The rule behind every ``--resume``."""
    if not isinstance(had, dict):
        return "it carries no settings (made by another program or an older version)"
    keys = sorted(set(had) | set(want))
    return "; ".join(f"{k} was {had.get(k)!r}, now {want.get(k)!r}" for k in keys if had.get(k) != want.get(k))


def read_run(out_dir: str) -> dict[str, Any] | None:
    """The folder's run file (settings and splits of the command that made it), or None."""
    path = os.path.join(out_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    run = load_json(path)
    if not isinstance(run, dict) or not isinstance(run.get("splits"), list):
        raise OutputError(f"{path}: not a scout-data run file")
    return run


def write_run(out_dir: str, settings: dict[str, Any], splits: Iterable[str]) -> None:
    run = {"settings": settings, "splits": sorted(set(splits))}
    atomic_write_text(os.path.join(out_dir, RUN_FILE), json.dumps(run, indent=2, ensure_ascii=False) + "\n")


def _split_files(out_dir: str) -> dict[str, str]:
    """This command's split files in ``out_dir`` (those its run file names), never a user's other JSON."""
    run = read_run(out_dir)
    splits = run["splits"] if run else []
    return {s: p for s in splits if os.path.isfile(p := os.path.join(out_dir, f"{s}.json"))}


def _shard_files(out_dir: str, split: str | None = None) -> list[str]:
    pattern = f"{split}-*.json" if split else "*-*.json"
    return sorted(glob.glob(os.path.join(out_dir, SHARDS, pattern)))


def _read_list(path: str) -> list[dict[str, Any]]:
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return data


def prepare_out_dir(out_dir: str, resume: bool, settings: dict[str, Any] | None = None) -> set[str]:
    """Create ``out_dir`` or check it may be used; returns the ids already written (with ``resume``).

    ``settings`` are what makes the records (JSON values); a resumed folder must have been made with the same.
    Call it holding :func:`output_lock` on ``out_dir``: a resumed folder's stale temporaries are removed."""
    settings = json.loads(json.dumps(settings or {}, default=str))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"--out {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temporaries(os.path.join(out_dir, RUN_FILE))  # a run killed while it wrote its run file
    if not resume:
        if set(os.listdir(out_dir)) - {RUN_FILE}:
            raise OutputError(
                f"--out {out_dir} is not empty; pass --resume to continue that run, or choose an empty folder"
            )
        write_run(out_dir, settings, [])
        return set()
    run = read_run(out_dir)
    if run is None:
        if os.listdir(out_dir):
            raise OutputError(f"--out {out_dir}: no {RUN_FILE}, so this command did not make it; nothing to resume")
        write_run(out_dir, settings, [])
        return set()
    differ = describe_differences(run.get("settings"), settings)
    if differ:
        raise OutputError(f"--out {out_dir} was made with other settings ({differ}); cannot resume it")
    remove_stale_temporaries(out_dir, tree=True)
    done: set[str] = set()
    for path in [*_split_files(out_dir).values(), *_shard_files(out_dir)]:
        done.update(str(r.get("id")) for r in _read_list(path) if isinstance(r, dict))
    return done


def reason_key(reason: str) -> str:
    """Group reasons that differ only in numbers (box values, sizes) or quoted text (ids, file names)."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", re.sub(r"-?\d+(?:\.\d+)?", "#", reason))[:120]


class DatasetWriter:
    """Collects samples, renders and checks each record, writes shards and, on :meth:`close`, split files."""

    def __init__(
        self,
        out_dir: str,
        *,
        source: str,
        image_folder: str | None,
        frame: str = DEFAULT_FRAME,
        shard_size: int = 5000,
        done_ids: set[str] | None = None,
        check_images: bool = True,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.source = source
        self.image_folder = image_folder
        self.frame = frame
        self.shard_size = max(1, shard_size)
        self.done_ids = set(done_ids or ())
        self.seen: set[str] = set()
        self.images = ImageChecker(image_folder, verify=False) if (check_images and image_folder) else None
        self.info = info or {}
        self.buffers: dict[str, list[dict[str, Any]]] = {}
        self.written: Counter[str] = Counter()
        self.already_done = 0
        self.skips: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.started = time.time()

    def skip(self, ref: str, reason: str) -> None:
        key = reason_key(reason)
        self.skips[key] += 1
        ex = self.examples.setdefault(key, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(f"{ref}: {reason}")

    def add(self, item: Sample | Skip) -> None:
        if isinstance(item, Skip):
            self.skip(item.ref, item.reason)
            return
        if item.id in self.done_ids:
            self.already_done += 1
            return
        if item.id in self.seen:
            self.skip(item.id, "duplicate id")
            return
        try:
            record = render_record(item, self.frame)
        except (ValueError, ZeroDivisionError) as exc:
            self.skip(item.id, f"cannot render: {exc}")
            return
        problems = record_problems(record, self.image_folder if self.images else None, self.images)
        if problems:
            self.skip(item.id, problems[0])
            return
        self.seen.add(item.id)
        buf = self.buffers.setdefault(item.split, [])
        buf.append(record)
        self.written[item.split] += 1
        if len(buf) >= self.shard_size:
            self._flush(item.split)

    def _flush(self, split: str) -> None:
        buf = self.buffers.get(split)
        if not buf:
            return
        existing = _shard_files(self.out_dir, split)
        n = 1 + max((int(p.rsplit("-", 1)[1][:-5]) for p in existing), default=-1)
        atomic_write_records(os.path.join(self.out_dir, SHARDS, f"{split}-{n:05d}.json"), buf)
        self.buffers[split] = []

    def _merge(self, split: str) -> int:
        final = os.path.join(self.out_dir, f"{split}.json")
        parts = ([final] if os.path.exists(final) else []) + _shard_files(self.out_dir, split)
        ids: set[str] = set()
        merged = []
        for path in parts:
            for r in _read_list(path):
                if str(r.get("id")) not in ids:
                    ids.add(str(r.get("id")))
                    merged.append(r)
        atomic_write_records(final, merged)
        for path in parts[1 if parts and parts[0] == final else 0 :]:
            os.remove(path)
        return len(merged)

    def close(self) -> dict[str, Any]:
        """Flush, merge shards into split files, write and return the summary."""
        for split in list(self.buffers):
            self._flush(split)
        run = read_run(self.out_dir)
        splits = sorted(
            {os.path.basename(p).rsplit("-", 1)[0] for p in _shard_files(self.out_dir)}
            | set(_split_files(self.out_dir))
        )
        totals = {s: self._merge(s) for s in splits}
        if run is not None:
            write_run(self.out_dir, run.get("settings", {}), splits)
        shard_dir = os.path.join(self.out_dir, SHARDS)
        if os.path.isdir(shard_dir) and not os.listdir(shard_dir):
            os.rmdir(shard_dir)
        summary = {
            "source": self.source,
            "out_dir": os.path.abspath(self.out_dir),
            "image_folder": os.path.abspath(self.image_folder) if self.image_folder else None,
            "box_frame": self.frame,
            "files": {s: os.path.abspath(os.path.join(self.out_dir, f"{s}.json")) for s in splits},
            "records": totals,
            "written_this_run": dict(sorted(self.written.items())),
            "already_done": self.already_done,
            "skipped": {
                "total": sum(self.skips.values()),
                "by_reason": dict(self.skips.most_common()),
                "examples": self.examples,
            },
            "seconds": round(time.time() - self.started, 3),
            **self.info,
        }
        atomic_write_text(
            os.path.join(self.out_dir, SUMMARY), json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
        )
        return summary


def write_dataset(
    items: Iterable[Sample | Skip],
    out_dir: str,
    *,
    source: str,
    image_folder: str | None,
    frame: str = DEFAULT_FRAME,
    shard_size: int = 5000,
    done_ids: set[str] | None = None,
    total: int | None = None,
    check_images: bool = True,
    info: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Consume ``items`` into ``out_dir`` (prepared by :func:`prepare_out_dir`); returns the summary."""
    writer = DatasetWriter(
        out_dir,
        source=source,
        image_folder=image_folder,
        frame=frame,
        shard_size=shard_size,
        done_ids=done_ids,
        check_images=check_images,
        info=info,
    )
    bar = tqdm(total=total, unit="rec", desc=source, disable=None if progress is None else not progress)
    try:
        for item in items:
            writer.add(item)
            bar.update(1)
    finally:
        bar.close()
    return writer.close()


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['source']}: wrote {sum(summary['written_this_run'].values())} records "
        f"in {summary['seconds']:.1f} s"
    ]
    for split, n in summary["records"].items():
        lines.append(f"  {split}: {n} records in {summary['files'][split]}")
    if summary["already_done"]:
        lines.append(f"  already written before (--resume): {summary['already_done']}")
    sk = summary["skipped"]
    if sk["total"]:
        lines.append(f"  skipped {sk['total']}:")
        for key, n in sk["by_reason"].items():
            lines.append(f"    {n} x {key}")
            lines.extend(f"        e.g. {e}" for e in sk["examples"][key][:3])
    if summary["image_folder"]:
        lines.append(f"  train LLaVA with --image_folder {summary['image_folder']}")
    lines.append(f"  summary: {os.path.join(summary['out_dir'], SUMMARY)}")
    return "\n".join(lines)

"""Reading what a user gives: one owner for the kind and size limits on every input file and request body.

Every command and server that reads a file calls :func:`read_input` (or :func:`check_input` before handing a path
to a library that opens it): only regular files are read (``/dev/zero``, a FIFO or a folder never is), and never more
bytes than the limit for that kind of input (a bigger file is refused before it is read). Pixel limits on images
live with the image reader (:mod:`scout_data.images`), which reads its file through here.
"""

from __future__ import annotations

import os
import stat

MiB = 1 << 20
MAX_DATA_BYTES = 4096 * MiB  # a JSON / JSON-lines / pickle data file (LLaVA's mix665k is 1 GB, VG's regions 0.7 GB)
MAX_CONFIG_BYTES = 64 * MiB  # a checkpoint's config.json, tokenizer and index files
MAX_IMAGE_BYTES = 64 * MiB  # one image file (a 40-megapixel PNG photo fits)
MAX_TEXT_BYTES = 256 * MiB  # a line-based text annotation file (Flickr30k's sentences, split lists)
# a worker request: one image, base64-encoded (4/3), and the conversation
MAX_REQUEST_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 4 * MiB


class InputError(ValueError):
    """An input that is not read: not a regular file, or over its size limit; the message names it."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n} bytes"


def size_problem(size: int, limit: int, what: str) -> str | None:
    """Why ``size`` bytes of ``what`` are refused, or None."""
    if size > limit:
        return f"{what} is {_size(size)}; the limit is {_size(limit)}"
    return None


def _name(path: str | os.PathLike, what: str, name: str | None) -> str:
    return name or f"{what} {os.fspath(path)}".strip()


def check_input(path: str | os.PathLike, limit: int = MAX_DATA_BYTES, what: str = "", name: str | None = None) -> int:
    """The size of the regular file at ``path`` (symlinks followed), or an :class:`InputError` (``FileNotFoundError``
    when there is nothing) naming ``what`` and the path (or ``name``): not a regular file, or bigger than ``limit``."""
    name = _name(path, what, name)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such file") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{name}: is {_kind(info.st_mode)}; expected a regular file")
    if problem := size_problem(info.st_size, limit, "it"):
        raise InputError(f"{name}: {problem} for this kind of input")
    return info.st_size


def read_input(path: str | os.PathLike, limit: int = MAX_DATA_BYTES, what: str = "", name: str | None = None) -> bytes:
    """The bytes of the regular file at ``path``, after :func:`check_input`; a file that grows past ``limit`` while
    it is read is refused too."""
    name = _name(path, what, name)
    check_input(path, limit, name=name)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise InputError(f"{name}: it grew past {_size(limit)} while it was read")
    return data

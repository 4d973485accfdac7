"""Bounded work: every ratio, size and count a user passes on the command line has a stated limit.

:class:`Bounded` is an argparse ``type``: it parses a number, refuses one outside its range (or not finite) with a
message naming the range, and gives the range for ``--help`` (``str(bounded)``). :class:`OneLineParser` reports a
bad flag as one line (exit status 2), as every other bad input is reported.
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class Bounded:
    """A number of ``kind`` (int or float) in ``[lo, hi]``, finite."""

    def __init__(self, kind: type, lo: float, hi: float) -> None:
        self.kind, self.lo, self.hi = kind, lo, hi
        self.__name__ = "integer" if kind is int else "number"  # argparse names the type in its messages

    def __str__(self) -> str:
        return f"{self.__name__} in [{_number(self.lo)}, {_number(self.hi)}]"

    def __call__(self, text: str) -> int | float:
        want = f"an {self}" if self.kind is int else f"a finite {self}"
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
        if not (math.isfinite(value) and self.lo <= value <= self.hi):
            raise argparse.ArgumentTypeError(f"{text}: must be {want}")
        return value


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line naming the command and the flag (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# scout_data's limits, stated in each flag's help
SHARD_SIZE = Bounded(int, 1, 1_000_000)
WORKERS = Bounded(int, 1, 256)
REPORT = Bounded(int, 0, 1_000_000)
MIX_RATIO = Bounded(float, 0, 100)
MIX_REPLAY_FRACTION = Bounded(float, 0, 0.99)
MAX_MIX_RECORDS = 10_000_000  # records a mix may hold in all (it is built in memory)
PER_IMAGE = Bounded(int, 0, 1000)  # samples or instances a converter takes per image
MAX_EXPRESSION_CHARS = 1000  # a referring expression or caption a converter turns into a query (RefCOCOg's: < 400)

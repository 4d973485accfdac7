"""A settings dataclass on the command line: the flags a caller writes (``spec_flags``) and the parser that reads
them back (``add_spec_arguments``, ``spec_from_args``), so every field round-trips, booleans included."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, TypeVar

Spec = TypeVar("Spec")


def spec_flags(spec: Any) -> list[str]:
    """A settings dataclass as the ``--field-name=value`` flags its module's command line reads."""
    return [f"--{key.replace('_', '-')}={value}" for key, value in asdict(spec).items()]


def _true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text.lower() == "true"


def add_spec_arguments(parser: argparse.ArgumentParser, defaults: Any, limits: Mapping[str, Any] = {}) -> None:  # noqa: B006
    """One ``--field-name`` option per field of the dataclass instance ``defaults``, typed like its default, or by
    its entry of ``limits`` (an argparse type such as :class:`scout_data.limits.Bounded`, named in ``--help``)."""
    for name, value in asdict(defaults).items():
        kind = limits.get(name) or (_true_or_false if isinstance(value, bool) else type(value))
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value,
                            help=str(kind) if name in limits else None)


def spec_from_args(cls: type[Spec], args: argparse.Namespace) -> Spec:
    """The dataclass ``cls`` from parsed arguments (see ``add_spec_arguments``)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

"""The routes a prompt can take through TWIST, named once (no imports: the CLI, eval and playground read them).

:class:`Route` is the one vocabulary: every boundary (a command line's ``--route``, a worker request's
``twist_route``, the playground's selector, ``config.json``'s ``twist_route``) parses its text once with
:meth:`Route.parse`; inside, a route is a ``Route``. It is a ``str`` enum, so ``Route.FROZEN == "frozen"`` and JSON
writes its value.
"""

from __future__ import annotations

from enum import Enum


class Route(str, Enum):
    AUTO = "auto"  # the router decides per prompt
    FROZEN = "frozen"  # the original LLaVA computation, bit for bit
    GROUNDING = "grounding"  # through the grounding experts

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def forced(self) -> bool:
        """Whether this route is taken whatever the router says."""
        return self is not Route.AUTO

    @classmethod
    def parse(cls, value: object, what: str = "route") -> Route:
        """``value`` (a route's name, or a Route) as a Route; ValueError naming ``what`` and the names otherwise."""
        if isinstance(value, Route):
            return value
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(f"{what} {value!r}: expected one of {', '.join(ROUTES)}")

    @classmethod
    def taken(cls, grounding: bool) -> Route:
        """The route a per-sample decision (True: grounding) names."""
        return cls.GROUNDING if grounding else cls.FROZEN


AUTO, FROZEN, GROUNDING = Route.AUTO, Route.FROZEN, Route.GROUNDING
ROUTES = tuple(route.value for route in Route)  # the names, for argparse's choices and messages
TASK_ROUTE = {"grounding": GROUNDING, "understanding": FROZEN}  # a record's task (scout_data.schema) -> its route


def route_flag(value: str) -> Route:
    """argparse ``type`` of a ``--route`` flag: the :class:`Route`, or argparse's one-line error naming the routes."""
    import argparse

    try:
        return Route.parse(value, "--route")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


ROUTE_METAVAR = "{" + ",".join(ROUTES) + "}"

"""The colours boxes are drawn in, everywhere (data previews, the CLI's and the playground's images): one per
step, in order, and the answer's."""

from __future__ import annotations

STEP_COLOURS = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
)
ANSWER_COLOUR = (255, 215, 0)


def step_colour(index: int) -> tuple[int, int, int]:
    """The colour of step ``index`` (1-based, as the chain numbers its steps)."""
    return STEP_COLOURS[(index - 1) % len(STEP_COLOURS)]

"""The chain format's one owner: SCOUT's ``Step k: ...`` lines, then ``Answer: ...``.

Writers build lines with :func:`step_line` and :func:`answer_line`; readers find markers with
:data:`MARKER_RE` (anywhere, leniently: the parser of model output) or :data:`LINE_MARKER_RE` (at the start of
a line only: the span ids of training tokens). Box text is :func:`scout_data.boxes.format_box`'s.
"""

from __future__ import annotations

import re

STEP_WORD, ANSWER_WORD = "Step", "Answer"
MARKER_RE = re.compile(rf"(?<![A-Za-z])(?:{STEP_WORD}\s*(\d{{1,9}})\s*:|{ANSWER_WORD}\s*:)")
LINE_MARKER_RE = re.compile(rf"(?:^|\n)[ \t]*(?:{STEP_WORD}[ \t]*(\d+)|({ANSWER_WORD}))[ \t]*:")


def step_label(k: int) -> str:
    """``Step 3`` (what a step's boxes are called)."""
    return f"{STEP_WORD} {k}"


def step_line(k: int, text: str) -> str:
    """``Step k: text``."""
    return f"{step_label(k)}: {text}".rstrip()


def answer_line(text: str) -> str:
    """``Answer: text``."""
    return f"{ANSWER_WORD}: {text}".rstrip()


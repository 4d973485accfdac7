"""The chain format's one owner: SCOUT's ``Step k: ...`` lines, then ``Answer: ...``, and the step grammar.

The step grammar (``decide`` chains, every source that has the boxes for it): each step is a sub-question the
expression poses, in the order it reads, and the last step decides.

- :func:`locate_step`: the objects the expression's noun phrase names, in its words, with their boxes, left to
  right (``the triangles <box>, <box>``): the candidates;
- :func:`reference`: a relation's anchor, by its role (``the reference object <box>``);
- :func:`pick`: the step that decides (``the one it asks for: <box>``); the answer then copies that box.

Words a step copies come from the question's first noun phrase, which a model reads first; the anchor and the
deciding step name their role instead of repeating the question's later words (the anchor, the relation, the
superlative): the miniature's model did not copy those (docs/demo-notes.md, "Steps that pay"), and the box the
deciding step writes is what the question asks for, as a one-shot answer is.

Writers build lines with :func:`step_line` and :func:`answer_line`; readers find markers with
:data:`MARKER_RE` (anywhere, leniently: the parser of model output) or :data:`LINE_MARKER_RE` (at the start of
a line only: the span ids of training tokens). Box text is :func:`scout_data.boxes.format_box`'s.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from scout_data.boxes import Box
from scout_data.schema import BOX_SLOT, Step

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



DECIDE_SEPARATOR = ":"
REFERENCE = "the reference object"  # a relation's anchor step
PICK = "the one it asks for"  # the step that decides a referring expression


def locate_step(phrase: str, boxes: int) -> str:
    """``the triangles <box>, <box>``: a phrase of the expression, then one slot per object it names."""
    return f"{phrase} {', '.join([BOX_SLOT] * boxes)}"


def decide_step(fact: str, boxes: int = 1) -> str:
    """``the one it asks for: <box>``: the deciding fact, then the slot(s) of what it picks."""
    return f"{fact}{DECIDE_SEPARATOR} {', '.join([BOX_SLOT] * boxes)}"


def step_phrase(text: str) -> str:
    """A step's words before its first box (slots filled or not)."""
    return re.split(r"[\[<]", text, maxsplit=1)[0]


def is_decide_step(text: str) -> bool:
    """Whether a step's text states a deciding fact: its words end in ``:`` before a box."""
    return step_phrase(text).rstrip().endswith(DECIDE_SEPARATOR)


def locate(one: str, many: str, boxes: Sequence[Box]) -> Step:
    """A step that names objects with their boxes: ``one`` (``the red square``) for one box, ``many``
    (``the triangles``) for several; the boxes in the order given (sources give them left to right)."""
    return Step(locate_step(one if len(boxes) == 1 else many, len(boxes)), list(boxes))


def decide(fact: str, boxes: Sequence[Box]) -> Step:
    """The step that decides: ``fact`` and the box(es) it picks, which the answer then copies."""
    return Step(decide_step(fact, len(boxes)), list(boxes))


def reference(box: Box) -> Step:
    """A relation's anchor, by its role: ``the reference object <box>``."""
    return Step(locate_step(REFERENCE, 1), [box])


def pick(boxes: Sequence[Box]) -> Step:
    """The step that decides a referring expression: ``the one it asks for: <box>``."""
    return decide(PICK, boxes)

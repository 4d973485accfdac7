"""The one parser of chain text (gpt turns, model output): used by validation, evaluation, the playground.

Grammar (lenient): ``Step N: sentence`` markers, then ``Answer: text``; boxes are LLaVA-1.5's
``[x1, y1, x2, y2]``, fractions of the image in [0, 1], with any number of decimals and optional spaces.
Text without ``Answer:`` but with boxes (one-shot region answers) answers with every box it holds.
:func:`parse_chain` never raises: whatever is odd is noted in ``problems`` (boxes a little outside [0, 1]
are clamped and noted; a box with a coordinate past ``NORMALISED_LIMIT``, such as pixels or Ferret's 0-1000
grid, is not read at all). Other models' box formats (Qwen-VL's ``<box>(x1,y1),(x2,y2)</box>``, MiniGPT-v2's
``{<x1><y1><x2><y2>}``) are not read.

Problems start with a stable phrase: ``no answer line``, ``unparseable box``, ``unterminated box``,
``coordinates not normalised``, ``box outside [0, 1]``, ``degenerate box``, ``steps out of order``,
``text before Step 1``, ``step after the answer``, ``several answer lines``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from scout_data.boxes import Box, clamp_xyxy_norm, is_degenerate
from scout_data.chain import MARKER_RE

_NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
BOX_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_BRACKET_RE = re.compile(r"\[[^\[\]\n]{0,200}\]")
_UNTERMINATED_RE = re.compile(r"\[[\d\s.,\-]*$")
NORMALISED_LIMIT = 1.5  # a coordinate past this is not a fraction of the image that was clamped, but another unit
NO_ANSWER_LINE = "no answer line"
BROKEN_BOX_PROBLEMS = ("unparseable box", "unterminated box", "coordinates not normalised")
INVALID_BOX_PROBLEMS = (*BROKEN_BOX_PROBLEMS, "box outside", "degenerate box")  # not fit to train on


@dataclass
class ParsedStep:
    index: int  # the number the text gave the step
    text: str  # the sentence, box texts included
    boxes_xyxy_norm: list[Box] = field(default_factory=list)


@dataclass
class ParsedChain:
    steps: list[ParsedStep] = field(default_factory=list)
    answer_text: str = ""  # text after ``Answer:`` (boxes included); the whole text when there are no markers
    answer_boxes_xyxy_norm: list[Box] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    has_answer_line: bool = False

    @property
    def answer_words(self) -> str:
        """The answer text without its boxes (e.g. ``"3"`` for a count answer)."""
        return " ".join(BOX_RE.sub(" ", self.answer_text).replace(",", " ").split())

    def all_boxes_xyxy_norm(self) -> list[Box]:
        return [b for s in self.steps for b in s.boxes_xyxy_norm] + list(self.answer_boxes_xyxy_norm)


def parse_boxes(text: str, problems: list[str] | None = None) -> list[Box]:
    """Every box in ``text``, clamped to [0, 1]; odd boxes are noted in ``problems``."""
    notes = problems if problems is not None else []
    boxes: list[Box] = []
    for m in BOX_RE.finditer(text):
        try:
            raw = tuple(float(g) for g in m.groups())
        except (ValueError, OverflowError):
            notes.append(f"unparseable box {m.group(0)!r}")
            continue
        if max(abs(v) for v in raw) > NORMALISED_LIMIT:
            notes.append(f"coordinates not normalised {m.group(0)}: LLaVA's boxes are fractions of the image")
            continue
        box = clamp_xyxy_norm(raw)
        if box != raw:
            notes.append(f"box outside [0, 1] (clamped): {m.group(0)}")
        if is_degenerate(box):
            notes.append(f"degenerate box {m.group(0)}")
        boxes.append(box)  # type: ignore[arg-type]
    for m in _BRACKET_RE.finditer(text):
        inner = m.group(0)
        if any(c.isdigit() for c in inner) and not BOX_RE.fullmatch(inner):
            notes.append(f"unparseable box {inner[:60]!r}")
    tail = _UNTERMINATED_RE.search(text)
    if tail and any(c.isdigit() for c in tail.group(0)):
        notes.append(f"unterminated box {tail.group(0)[:60]!r}")
    return boxes


def broken_box(problems: list[str]) -> str | None:
    """The first problem that says a box was written but could not be read, if any."""
    return next((p for p in problems if p.startswith(BROKEN_BOX_PROBLEMS)), None)


def _segments(text: str) -> tuple[str, list[tuple[str, int | None, str]]]:
    """Text before the first marker, then ``(marker, step number or None for Answer, body)``."""
    marks = list(MARKER_RE.finditer(text))
    head = text[: marks[0].start()] if marks else text
    segs = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        num = int(m.group(1)) if m.group(1) is not None else None
        segs.append((m.group(0), num, text[m.end() : end]))
    return head, segs


def parse_chain(text: str) -> ParsedChain:
    """Parse a chain; never raises."""
    try:
        return _parse_chain(text if isinstance(text, str) else str(text))
    except Exception as exc:  # a parser bug must not take down evaluation or the playground
        return ParsedChain(problems=[f"unparseable text ({type(exc).__name__}: {exc})"])


def _parse_chain(text: str) -> ParsedChain:
    out = ParsedChain()
    head, segs = _segments(text)
    if not segs:
        out.answer_text = text.strip()
        out.answer_boxes_xyxy_norm = parse_boxes(text, out.problems)
        if not out.answer_boxes_xyxy_norm and not broken_box(out.problems):
            out.problems.append(NO_ANSWER_LINE)
        return out
    if head.strip():
        out.problems.append(f"text before Step 1: {head.strip()[:60]!r}")
    for marker, num, body in segs:
        if num is None:
            if out.has_answer_line:
                out.problems.append("several answer lines")
                continue
            out.has_answer_line = True
            out.answer_text = body.strip()
            out.answer_boxes_xyxy_norm = parse_boxes(body, out.problems)
            continue
        if out.has_answer_line:
            out.problems.append(f"step after the answer: {marker!r}")
            continue
        expected = len(out.steps) + 1
        if num != expected:
            out.problems.append(f"steps out of order: expected Step {expected}, got Step {num}")
        out.steps.append(ParsedStep(num, body.strip(), parse_boxes(body, out.problems)))
    if not out.has_answer_line:
        out.problems.append(NO_ANSWER_LINE)
    return out

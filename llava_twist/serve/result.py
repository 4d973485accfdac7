"""What a model's answer means: its text parsed into steps and boxes in pixels of the original image.

Pure: no model, no torch, no transformers (the scorers and the playground's streaming read answers with it).
One answer goes: text -> parsed chain (:func:`scout_data.parse.parse_chain`, the one parser) -> boxes mapped
from the frame the model answers in to pixels of the original image (:mod:`scout_data.boxes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from scout_data.boxes import DEFAULT_FRAME, FRAMES, Box, box_xyxy_norm_to_px, clamp_xyxy_px
from scout_data.chain import ANSWER_WORD, MARKER_RE, step_label
from scout_data.parse import BOX_RE, NO_ANSWER_LINE, ParsedChain, broken_box, parse_boxes, parse_chain


class InferenceError(Exception):
    """A problem the user can fix (missing image, unloadable model, bad option): shown as a message."""


@dataclass
class GroundedBox:
    label: str  # "Step 2" or "Answer"
    step: int | None  # the step's number, None for answer boxes
    box_xyxy_norm: Box  # as the model wrote it (clamped to [0, 1]), in ``InferenceResult.box_frame``
    box_xyxy_px: Box  # pixels of the original image, clamped to it


@dataclass
class InferenceResult:
    """One answer: text, parsed chain, boxes in original-image pixels, route and router probability."""

    text: str
    chain: ParsedChain
    boxes: list[GroundedBox]
    image_size: tuple[int, int]
    box_frame: str
    route: str | None = None  # None for plain LLaVA
    router_prob: float | None = None
    route_forced: bool = False
    answer_box_scores: list[float] | None = None  # geometric-mean token probability of each answer box's text
    prompt: str = ""

    @property
    def answer_boxes_xyxy_px(self) -> list[Box]:
        return [b.box_xyxy_px for b in self.boxes if b.step is None]

    @property
    def miss_reason(self) -> str | None:
        """Why this answer gives no box (None when it gives one): the parser's first problem."""
        if self.chain.answer_boxes_xyxy_norm:
            return None
        answer_problems: list[str] = []
        parse_boxes(self.chain.answer_text, answer_problems)
        broken = broken_box(answer_problems)
        if broken:
            return f"broken box ({broken})"
        problems = self.chain.problems
        if NO_ANSWER_LINE in problems:
            return NO_ANSWER_LINE
        return "no box in the answer" + (f" ({problems[0]})" if problems else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "route": self.route,
            "router_prob": self.router_prob,
            "route_forced": self.route_forced,
            "image_size": list(self.image_size),
            "box_frame": self.box_frame,
            "steps": [
                {
                    "index": s.index,
                    "text": s.text,
                    "boxes_xyxy_px": [list(b.box_xyxy_px) for b in self.boxes if b.step == s.index],
                }
                for s in self.chain.steps
            ],
            "answer": self.chain.answer_text,
            "answer_boxes_xyxy_px": [list(b) for b in self.answer_boxes_xyxy_px],
            "answer_box_scores": self.answer_box_scores,
            "boxes": [asdict(b) for b in self.boxes],
            "problems": list(self.chain.problems),
            "miss_reason": self.miss_reason,
        }


def answer_box_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the answer's boxes, in the order :func:`parse_chain` lists them."""
    marks = list(MARKER_RE.finditer(text))
    if not marks:
        start, end = 0, len(text)
    else:
        answers = [i for i, m in enumerate(marks) if m.group(1) is None]
        if not answers:
            return []
        i = answers[0]
        start = marks[i].end()
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
    return [(m.start() + start, m.end() + start) for m in BOX_RE.finditer(text[start:end])]


def result_from_text(
    text: str,
    image_size: tuple[int, int],
    box_frame: str = DEFAULT_FRAME,
    route: str | None = None,
    router_prob: float | None = None,
    route_forced: bool = False,
    answer_box_scores: list[float] | None = None,
    prompt: str = "",
) -> InferenceResult:
    """Parse model output and map its boxes to pixels of the original ``image_size`` (width, height)."""
    if box_frame not in FRAMES:
        raise InferenceError(f"--box-frame {box_frame!r}: expected one of {FRAMES}")
    width, height = image_size
    chain = parse_chain(text)

    def px(box: Box) -> Box:
        return clamp_xyxy_px(box_xyxy_norm_to_px(box, width, height, box_frame), width, height)

    boxes = [
        GroundedBox(step_label(s.index), s.index, tuple(b), px(b)) for s in chain.steps for b in s.boxes_xyxy_norm
    ]
    boxes += [GroundedBox(ANSWER_WORD, None, tuple(b), px(b)) for b in chain.answer_boxes_xyxy_norm]
    return InferenceResult(
        text=text,
        chain=chain,
        boxes=boxes,
        image_size=(width, height),
        box_frame=box_frame,
        route=route,
        router_prob=router_prob,
        route_forced=route_forced,
        answer_box_scores=answer_box_scores,
        prompt=prompt,
    )

"""One answer's panel while it streams: the steps in their colours with pixel boxes, the route, why there is
no box."""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from llava_twist.serve.result import InferenceResult
from scout_data.chain import ANSWER_WORD, step_label
from scout_data.palette import ANSWER_COLOUR, step_colour

NO_BOX = "No boxes in the model's output"
NO_ANSWER_BOX = "No box in the answer"


@dataclass
class PanelUpdate:
    """The state of one answer while it streams: text so far, its parsed boxes and the annotated image."""

    result: InferenceResult
    image: Image.Image
    done: bool
    route_label: str  # the selector's choice

    def html(self) -> str:
        return chain_html(self.result, self.done)

    def info(self) -> str:
        return route_info(self.result, self.done, self.route_label)

    def data(self) -> dict[str, Any]:
        payload = self.result.to_json()
        payload["done"] = self.done
        return payload


def _rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({}, {}, {})".format(*colour)


def _fmt_px(box: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


def chain_html(result: InferenceResult, done: bool) -> str:
    """The steps, each in the colour of its boxes, with the boxes in original-image pixels."""
    rows = []
    steps = result.chain.steps
    for k, step in enumerate(steps):
        colour = step_colour(step.index)
        boxes = [b.box_xyxy_px for b in result.boxes if b.step == step.index]
        pending = not done and k == len(steps) - 1 and not result.chain.has_answer_line
        box_html = "".join(f' <code class="twist-box">{_fmt_px(b)} px</code>' for b in boxes)
        rows.append(
            f'<div class="twist-step{" twist-pending" if pending else ""}" data-step="{step.index}" '
            f'data-boxes="{len(boxes)}" style="border-left: 6px solid {_rgb(colour)}; padding-left: 8px; '
            f'margin: 4px 0;"><b>{step_label(step.index)}:</b> {html.escape(step.text)}{box_html}</div>'
        )
    answer = result.chain.answer_text
    if result.chain.has_answer_line or (not steps and answer):
        boxes = result.answer_boxes_xyxy_px
        box_html = "".join(f' <code class="twist-box">{_fmt_px(b)} px</code>' for b in boxes)
        rows.append(
            f'<div class="twist-answer" data-boxes="{len(boxes)}" style="border-left: 6px solid '
            f'{_rgb(ANSWER_COLOUR)}; padding-left: 8px; margin: 4px 0;"><b>{ANSWER_WORD}:</b> {html.escape(answer)}'
            f"{box_html}</div>"
        )
    if done and not result.boxes and result.text.strip():
        rows.append(
            '<div class="twist-raw"><i>No box could be read; the model wrote:</i>'
            f'<pre style="white-space: pre-wrap; margin: 4px 0;">{html.escape(result.text)}</pre></div>'
        )
    if not rows:
        rows.append('<div class="twist-empty"><i>waiting for the first words…</i></div>' if not done else "")
    return '<div class="twist-chain">' + "".join(rows) + "</div>"


def route_info(result: InferenceResult, done: bool, route_label: str) -> str:
    """Markdown: route (with the router's probability under Auto), progress, and why there is no box."""
    lines = []
    if result.route is not None:
        if result.route_forced:
            lines.append(f"**Route:** {result.route} (forced: {route_label})")
        else:
            prob = f"{result.router_prob:.3f}" if result.router_prob is not None else "n/a"
            lines.append(f"**Route:** {result.route} · router p(grounding) = **{prob}** (Auto)")
    elif not done:
        lines.append(f"**Route:** {route_label} · generating…")
    n_steps, n_boxes = len(result.chain.steps), len(result.boxes)
    lines.append(f"{n_steps} step{'s' * (n_steps != 1)} · {n_boxes} box{'es' * (n_boxes != 1)}"
                 f"{'' if done else ' so far'}")
    if done:
        if not result.boxes:
            reason = html.escape(result.miss_reason or "no box text")
            lines.append(f"⚠️ **{NO_BOX}** ({reason}): the model answered in words only. Try the Grounding "
                         "route or ask for boxes step by step.")
        elif result.miss_reason:
            lines.append(f"⚠️ **{NO_ANSWER_BOX}** ({html.escape(result.miss_reason)}); the steps' boxes are drawn.")
        notes = [p for p in result.chain.problems if p != result.miss_reason]
        lines += [f"note: {html.escape(p)}" for p in notes[:5]]
    return "  \n".join(lines)

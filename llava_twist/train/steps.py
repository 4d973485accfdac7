"""Stepwise supervision: which answer tokens belong to "Step k" and to "Answer", and their loss weights.

A SCOUT answer reads ``Step 1: ... [x1, y1, x2, y2].\\nStep 2: ...\\nAnswer: [...]``. Each supervised
token (label != IGNORE_INDEX) gets a *span id*: ``k >= 1`` for "Step k", ``SPAN_ANSWER`` for the
answer, ``SPAN_OTHER`` for supervised text outside any step (an understanding answer, text before
"Step 1"). Markers count only at the start of a line. Unsupervised tokens get ``SPAN_OTHER`` too; the
loss ignores them through the labels.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from llava.constants import IGNORE_INDEX

from scout_data.chain import LINE_MARKER_RE

SPAN_OTHER = -1
SPAN_ANSWER = 0
MAX_LOGGED_STEPS = 16  # steps beyond this share the last logged slot ("step_16+")

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def span_name(span_id: int) -> str:
    """Metric name of a span id: ``step_3``, ``answer``, ``other``."""
    if span_id == SPAN_ANSWER:
        return "answer"
    if span_id == SPAN_OTHER:
        return "other"
    return f"step_{span_id}" if span_id < MAX_LOGGED_STEPS else f"step_{MAX_LOGGED_STEPS}+"


def piece_text(piece: str | None) -> str:
    """Surface text of one tokenizer piece (SentencePiece ``▁``, byte-fallback ``<0x0A>``, byte-BPE ``Ġ``)."""
    if piece is None:
        return ""
    byte = _BYTE_PIECE.match(piece)
    if byte:
        value = int(byte.group(1), 16)
        return chr(value) if value < 128 else "\ufffd"
    if piece.startswith("<") and piece.endswith(">") and len(piece) > 2 and " " not in piece:
        return ""  # special tokens such as </s>
    return piece.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n")


def text_spans(text: str) -> list[tuple[int, int]]:
    """(start offset, span id) of each marker in ``text``, in order."""
    spans = []
    for m in LINE_MARKER_RE.finditer(text):
        start = m.start() + (1 if text[m.start()] == "\n" else 0)
        spans.append((start, SPAN_ANSWER if m.group(2) else int(m.group(1))))
    return spans


def run_span_ids(pieces: Sequence[str | None]) -> list[int]:
    """Span id of each token of one supervised run (one assistant turn), from its pieces."""
    texts = [piece_text(p) for p in pieces]
    starts, offset = [], 0
    for t in texts:
        stripped = t.lstrip(" \t\n")
        starts.append(offset + (len(t) - len(stripped) if stripped else 0))
        offset += len(t)
    markers = text_spans("".join(texts))
    if not markers:
        return [SPAN_OTHER] * len(pieces)
    marker_starts = [s for s, _ in markers]
    ids = []
    for s in starts:
        k = bisect.bisect_right(marker_starts, s) - 1
        ids.append(markers[k][1] if k >= 0 else SPAN_OTHER)
    return ids


def step_span_ids(labels: torch.Tensor, tokenizer) -> torch.Tensor:
    """Span ids (same shape as ``labels``, 1-D) for the supervised tokens of one sample."""
    out = torch.full_like(labels, SPAN_OTHER)
    supervised = (labels != IGNORE_INDEX).tolist()
    i, n = 0, len(supervised)
    while i < n:
        if not supervised[i]:
            i += 1
            continue
        j = i
        while j < n and supervised[j]:
            j += 1
        pieces = tokenizer.convert_ids_to_tokens(labels[i:j].tolist())
        out[i:j] = torch.tensor(run_span_ids(pieces), dtype=out.dtype)
        i = j
    return out


@dataclass
class StepWeights:
    """Loss weight per span. Unlisted spans weigh 1.

    Parsed from ``--twist_step_weights``: comma-separated items, each a bare number (step 1, step 2, ...
    in order) or ``key:weight`` with key ``answer``, ``other``, ``steps`` (every step), ``step_N`` or ``N``.
    E.g. ``"1,1,2"`` (step 3 counts double), ``"answer:2"``, ``"steps:0.5,answer:1"``.
    """

    steps: dict[int, float] = field(default_factory=dict)
    all_steps: float = 1.0
    answer: float = 1.0
    other: float = 1.0

    @classmethod
    def parse(cls, spec: str | None) -> StepWeights:
        weights = cls()
        if not spec or not spec.strip():
            return weights
        position = 0
        for raw in spec.split(","):
            item = raw.strip()
            key, sep, value = item.rpartition(":")
            if not sep:
                key, value = "", item
            try:
                weight = float(value)
            except ValueError:
                raise ValueError(f"--twist_step_weights {spec!r}: {item!r} has no numeric weight") from None
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"--twist_step_weights {spec!r}: weight {value!r} must be finite and >= 0")
            key = key.strip().lower()
            if not key:
                position += 1
                weights.steps[position] = weight
            elif key in ("answer", "other"):
                setattr(weights, key, weight)
            elif key == "steps":
                weights.all_steps = weight
            elif re.fullmatch(r"(step_?)?\d+", key) and int(re.sub(r"\D", "", key)) >= 1:
                weights.steps[int(re.sub(r"\D", "", key))] = weight
            else:
                raise ValueError(
                    f"--twist_step_weights {spec!r}: unknown key {key!r} (use answer, other, steps, step_N or N)"
                )
        return weights

    def is_uniform(self) -> bool:
        return self.all_steps == self.answer == self.other == 1.0 and all(w == 1.0 for w in self.steps.values())

    def weight(self, span_id: int) -> float:
        if span_id == SPAN_ANSWER:
            return self.answer
        if span_id == SPAN_OTHER:
            return self.other
        return self.steps.get(span_id, self.all_steps)

    def token_weights(self, span_ids: torch.Tensor) -> torch.Tensor:
        """Float weights, same shape as ``span_ids``."""
        top = int(span_ids.max().item()) if span_ids.numel() else 0
        table = torch.tensor([self.weight(s) for s in range(SPAN_OTHER, max(top, 0) + 1)], device=span_ids.device)
        return table[span_ids.clamp(min=SPAN_OTHER) - SPAN_OTHER]


def align_span_ids(labels: torch.Tensor, span_ids: torch.Tensor, mm_labels: torch.Tensor) -> torch.Tensor:
    """Carry span ids from the text labels onto the multimodal labels LLaVA builds (image tokens expanded,
    padding removed, truncated): the supervised tokens keep their order, so the k-th supervised token of a
    sample in ``mm_labels`` is the k-th in ``labels``."""
    out = torch.full_like(mm_labels, SPAN_OTHER)
    for b in range(mm_labels.shape[0]):
        dst = (mm_labels[b] != IGNORE_INDEX).nonzero().squeeze(1)
        src = (labels[b] != IGNORE_INDEX).nonzero().squeeze(1)[: dst.numel()]
        if src.numel() != dst.numel():
            raise RuntimeError(f"sample {b}: {dst.numel()} supervised multimodal tokens, {src.numel()} in the text")
        out[b, dst] = span_ids[b, src].to(out.device)
    return out

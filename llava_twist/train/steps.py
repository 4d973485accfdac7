"""Stepwise supervision: which answer tokens belong to "Step k" and to "Answer" (their span ids, which
:mod:`llava_twist.model.loss` weighs).

A SCOUT answer reads ``Step 1: ... [x1, y1, x2, y2].\\nStep 2: ...\\nAnswer: [...]``. Each supervised
token (label != IGNORE_INDEX) gets a *span id*: ``k >= 1`` for "Step k", ``SPAN_ANSWER`` for the
answer, ``SPAN_OTHER`` for supervised text outside any step (an understanding answer, text before
"Step 1"). Markers count only at the start of a line. Unsupervised tokens get ``SPAN_OTHER`` too; the
loss ignores them through the labels.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

import torch
from llava.constants import IGNORE_INDEX

from llava_twist.model.loss import SPAN_ANSWER, SPAN_OTHER
from scout_data.chain import LINE_MARKER_RE

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

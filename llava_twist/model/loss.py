"""TWIST's training loss, owned by the model: the language-model loss with a weight per chain span (each
"Step k", the answer, anything else) and the helpers that carry span ids onto LLaVA's multimodal labels.

A span id per supervised token: ``k >= 1`` for "Step k", :data:`SPAN_ANSWER` for the answer line,
:data:`SPAN_OTHER` for supervised text outside any step (an understanding answer). Uniform weights give the
mean next-token loss over supervised tokens, the loss LLaVA trains with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from llava.constants import IGNORE_INDEX

SPAN_OTHER = -1
SPAN_ANSWER = 0


@dataclass
class StepWeights:
    """Loss weight per span. Unlisted spans weigh 1.

    Parsed from ``--twist_step_weights``: comma-separated items, each a bare number (step 1, step 2, ...
    in order) or ``key:weight`` with key ``answer``, ``other``, ``steps`` (every step), ``last`` (each chain's last
    step, the one that decides, whatever its number; before ``step_N``), ``step_N`` or ``N``.
    E.g. ``"1,1,2"`` (step 3 counts double), ``"answer:2"``, ``"steps:0.5,answer:1"``, ``"last:3"``.
    """

    steps: dict[int, float] = field(default_factory=dict)
    all_steps: float = 1.0
    answer: float = 1.0
    other: float = 1.0
    last: float | None = None

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
            elif key in ("answer", "other", "last"):
                setattr(weights, key, weight)
            elif key == "steps":
                weights.all_steps = weight
            elif re.fullmatch(r"(step_?)?\d+", key) and int(re.sub(r"\D", "", key)) >= 1:
                weights.steps[int(re.sub(r"\D", "", key))] = weight
            else:
                raise ValueError(
                    f"--twist_step_weights {spec!r}: unknown key {key!r} (use answer, other, steps, last, step_N or N)"
                )
        return weights

    def is_uniform(self) -> bool:
        return (self.all_steps == self.answer == self.other == 1.0 and self.last in (None, 1.0)
                and all(w == 1.0 for w in self.steps.values()))

    def weight(self, span_id: int) -> float:
        if span_id == SPAN_ANSWER:
            return self.answer
        if span_id == SPAN_OTHER:
            return self.other
        return self.steps.get(span_id, self.all_steps)

    def token_weights(self, span_ids: torch.Tensor) -> torch.Tensor:
        """Float weights, same shape as ``span_ids`` (a row per chain: its last step is its highest step id)."""
        top = int(span_ids.max().item()) if span_ids.numel() else 0
        table = torch.tensor([self.weight(s) for s in range(SPAN_OTHER, max(top, 0) + 1)], device=span_ids.device)
        weights = table[span_ids.clamp(min=SPAN_OTHER) - SPAN_OTHER]
        if self.last is not None and span_ids.numel():
            last = span_ids.max(dim=-1, keepdim=True).values
            weights = torch.where((span_ids == last) & (last >= 1), torch.full_like(weights, self.last), weights)
        return weights


def stepwise_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, span_ids: torch.Tensor | None, weights: StepWeights
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss with per-span weights: ``sum(w_t * ce_t) / sum(w_t)`` over supervised tokens (uniform
    weights give the mean loss). Returns (loss, per-token ce (B, T-1), target span ids (B, T-1))."""
    targets = labels[:, 1:].to(logits.device)
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    spans = torch.full_like(targets, SPAN_OTHER) if span_ids is None else span_ids[:, 1:].to(ce.device)
    w = weights.token_weights(spans) * (targets != IGNORE_INDEX)
    loss = (ce * w).sum() / w.sum().clamp(min=torch.finfo(ce.dtype).tiny)
    return loss, ce, spans


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

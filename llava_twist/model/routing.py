"""Per-prompt routing: the router head, the per-forward route context and the route-aware KV cache.

A route is a boolean per sample: ``True`` = grounding route, ``False`` = the exact original (frozen)
computation. The router reads the hidden states entering one decoder layer, mean-pooled over the
prompt's text after the image, and decides once per prompt; decode steps reuse the decision stored in
the cache (`TwistCache.route`). What decides, and how it learns, is the router kind's
(:mod:`llava_twist.model.routers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache

from llava_twist.model.routes import Route

ROUTER_MARK = -2  # label value marking a router position while labels pass through LLaVA's multimodal prep
ROUTE_CODES = {Route.AUTO: -1, Route.FROZEN: 0, Route.GROUNDING: 1}  # a per-sample route as a tensor element


def route_codes(routes: Sequence[Route | str], device: torch.device | str | None = None) -> torch.Tensor:
    """(B,) int8 codes of one route per sample (``generate`` repeats them with the batch for beams)."""
    return torch.tensor([ROUTE_CODES[Route.parse(r, "twist_route")] for r in routes], dtype=torch.int8,
                        device=device)


def requested_routes(twist_route: Any, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(which samples' routes are forced, the forced routes: True = grounding), each (B,) bool, for a
    ``twist_route``: a :class:`Route` or its name (every sample), one per sample (a sequence, or their
    :func:`route_codes`), or a bool tensor (every sample forced, True: grounding)."""
    if isinstance(twist_route, (list, tuple)):
        twist_route = route_codes(twist_route, device)
    if isinstance(twist_route, torch.Tensor):
        if twist_route.shape != (batch,):
            raise ValueError(f"twist_route tensor must have shape ({batch},), got {tuple(twist_route.shape)}")
        twist_route = twist_route.to(device)
        if twist_route.dtype == torch.bool:
            return torch.ones_like(twist_route), twist_route
        return twist_route >= 0, twist_route == ROUTE_CODES[Route.GROUNDING]
    try:
        route = Route.parse(twist_route, "twist_route")
    except ValueError as exc:
        raise ValueError(f"{exc}, one per sample, or a bool tensor") from None
    return (torch.full((batch,), route.forced, dtype=torch.bool, device=device),
            torch.full((batch,), route is Route.GROUNDING, dtype=torch.bool, device=device))


@dataclass
class RouteDecision:
    """What the router saw and chose, per sample (a forward's ``twist_decision``; ``generate``'s, per row of its
    ``sequences``, with ``return_dict_in_generate=True``)."""

    prob: torch.Tensor | None  # (B,) router probability of the grounding route; None: no per-prompt router ran
    grounding: torch.Tensor  # (B,) bool, the route taken
    forced: torch.Tensor  # (B,) bool, True where the route was forced rather than chosen by the router

    def routes(self) -> list[Route]:
        return [Route.taken(g) for g in self.grounding.tolist()]

    def forced_rows(self) -> list[bool]:
        return [bool(f) for f in self.forced.tolist()]

    def probs(self) -> list[float | None]:
        """The router's probability per sample (None where no router ran)."""
        if self.prob is None:
            return [None] * len(self.grounding)
        return [float(p) for p in self.prob.tolist()]

    def rows(self, samples: int, rows: int) -> RouteDecision:
        """The decision per output row, for ``rows`` rows from ``samples`` prompts (a prompt's rows in a block, as
        ``generate`` expands for beams and ``num_return_sequences``), from this one over the prefill's rows."""
        index = torch.arange(samples, device=self.grounding.device) * (len(self.grounding) // samples)
        index = index.repeat_interleave(rows // samples)
        return RouteDecision(None if self.prob is None else self.prob.index_select(0, index.to(self.prob.device)),
                             self.grounding.index_select(0, index), self.forced.index_select(0, index))


class TwistRouter(nn.Module):
    """Linear probe (or one-hidden-layer MLP) over pooled hidden states -> grounding logit."""

    def __init__(self, hidden_size: int, router_hidden: int = 0) -> None:
        super().__init__()
        if router_hidden > 0:
            self.net = nn.Sequential(nn.Linear(hidden_size, router_hidden), nn.GELU(), nn.Linear(router_hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))

    def reset(self, bias: float = -4.0) -> None:
        """An untrained router sends every prompt down the frozen route (probability ~0.02)."""
        last = self.net[-1]
        with torch.no_grad():
            for module in self.net:
                if isinstance(module, nn.Linear) and module is not last:
                    nn.init.normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
            nn.init.zeros_(last.weight)
            last.bias.fill_(bias)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden_states (B, T, H), mask (B, T) bool -> logits (B,).

        The mask picks the positions pooled; without one that fits (None, or a decode step's shape), and for a
        prompt with no text after the image (an empty row), the router pools over every position.
        The pooled state is standardised (parameter-free layer norm) first: early Llama hidden states are
        tiny (token embeddings, norm ~0.3 per token), and an unnormalised linear probe on them learns at a
        fraction of its learning rate."""
        if mask is None or mask.shape != hidden_states.shape[:2]:
            mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        mask = mask | ~mask.any(dim=1, keepdim=True)
        mask = mask.to(hidden_states.dtype).unsqueeze(-1)
        pooled = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        pooled = F.layer_norm(pooled.float(), pooled.shape[-1:])
        return self.net(pooled.to(self.net[0].weight.dtype)).squeeze(-1).float()


def class_balanced_weights(target: torch.Tensor) -> torch.Tensor:
    """Per-sample weights (mean 1) under which each class present in ``target`` (0/1) carries half the loss."""
    positive = target > 0.5
    n_pos = positive.sum()
    n_neg = target.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.ones_like(target)
    half = target.numel() / 2.0
    return torch.where(positive, half / n_pos, half / n_neg).to(target.dtype)


def mark_router_positions(
    input_ids: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Labels with the router's positions set to ``ROUTER_MARK``.

    Router positions: attended text tokens after the (last) image, before the first supervised label
    (the prompt, not the answer). LLaVA's ``prepare_inputs_labels_for_multimodal`` carries labels
    alongside the embeddings it builds, so the marks come out aligned with the multimodal sequence.
    """
    marked = labels.clone() if labels is not None else torch.full_like(input_ids, IGNORE_INDEX)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    is_image = input_ids == IMAGE_TOKEN_INDEX
    last_image = torch.where(is_image, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
    mask = positions > last_image
    if labels is not None:
        supervised = labels != IGNORE_INDEX
        first_label = torch.where(supervised, positions, torch.full_like(positions, input_ids.shape[1]))
        mask &= positions < first_label.min(dim=1, keepdim=True).values
    if attention_mask is not None and attention_mask.shape == input_ids.shape:  # not a decode step
        mask &= attention_mask.bool()
    return marked.masked_fill(mask, ROUTER_MARK)


def split_router_marks(marked: torch.Tensor, had_labels: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(labels or None, router mask) from labels marked by `mark_router_positions`."""
    router_mask = marked == ROUTER_MARK
    labels = marked.masked_fill(router_mask, IGNORE_INDEX) if had_labels else None
    return labels, router_mask


class RouteContext:
    """State shared by a TWIST model and its twin layers for one forward pass.

    ``LlamaModel.forward`` calls its layers with a fixed signature, so the route travels here: the
    model fills it before running the layers; the router layer decides when the route is not given.
    """

    def __init__(self) -> None:
        self.route: torch.Tensor | None = None  # (B,) bool
        self.kind: Any = None  # the RouterKind (llava_twist.model.routers) deciding in this pass, when set
        self.head: nn.Module | None = None
        self.router_mask: torch.Tensor | None = None
        self.router_logits: torch.Tensor | None = None
        self.forced: tuple[torch.Tensor, torch.Tensor] | None = None  # samples forced, their routes (under auto)
        self.row_padding: list[int] | None = None  # each row's left padding, when rows are kept apart
        self.row_group = 0  # rows per prompt (1, or its beams) when each prompt computes as alone; 0: batched
        self.gate_logits: list[torch.Tensor] = []  # per-token gates (ablation), (B, T) per twin layer
        self.compute_both = False  # ZeRO-3 / training: run both experts whatever the route
        self.token_gate = False  # per-token gate ablation active
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (route, its frozen, grounding rows)

    def begin(
        self,
        route: torch.Tensor | None,
        kind: Any,
        head: nn.Module | None,
        router_mask: torch.Tensor | None,
        compute_both: bool,
        token_gate: bool = False,
        forced: tuple[torch.Tensor, torch.Tensor] | None = None,
        row_padding: list[int] | None = None,
        row_group: int = 0,
    ) -> None:
        self.route = route
        self.row_padding = row_padding
        self.row_group = row_group
        self.kind = kind
        self.head = head
        self.router_mask = router_mask
        self.router_logits = None
        self.forced = forced
        self.gate_logits = []
        self.compute_both = compute_both
        self.token_gate = token_gate

    def decide(self, hidden_states: torch.Tensor) -> None:
        """Run the router on the hidden states entering the router layer; fix the route if not given."""
        if self.kind is None:
            return
        self.router_logits = self.kind.logits(self.head, hidden_states, self.router_mask)
        if self.route is None:
            self.route = self.kind.decide(self.router_logits)
            if self.forced is not None:
                self.route = torch.where(self.forced[0], self.forced[1], self.route)

    def expert_rows(self, grounding_reads_frozen: bool) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(frozen expert's samples, grounding expert's samples) when each expert runs on its own samples only:
        under ``compute_both`` (training, ZeRO-3) with a per-sample route. Frozen's is None (every sample) when
        the grounding route reads the frozen expert (a mix ``a`` that is learned or not 0). None: no split, each
        expert that runs takes the whole batch (inference, the per-token gate, no route yet)."""
        if not self.compute_both or self.route is None or self.token_gate:
            return None
        if self._rows is None or self._rows[0] is not self.route:  # once per route (one host sync on a GPU)
            self._rows = (self.route, (~self.route).nonzero().squeeze(1), self.route.nonzero().squeeze(1))
        _, frozen, grounding = self._rows
        return (None if grounding_reads_frozen else frozen), grounding

    def needs(self) -> tuple[bool, bool]:
        """(some sample takes the frozen route, some takes the grounding route); both under compute_both."""
        if self.compute_both or self.route is None:
            return True, True
        return not bool(self.route.all()), bool(self.route.any())


class TwistCache(DynamicCache):
    """A `DynamicCache` keyed by layer index, so grounding-expert layers (indices ``>= num_layers``)
    keep their own entries and a skipped layer leaves no hole. It remembers the route decided at
    prefill so decode steps follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.route: torch.Tensor | None = None
        self._counted_step = False
        self._past_length = 0

    def begin_step(self) -> None:
        """Called once per forward, before any layer: the tokens cached so far are the past."""
        self._counted_step = False
        self._past_length = max((k.shape[-2] for k in self.keys.values()), default=0)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._counted_step:
            self.seen_tokens += key_states.shape[-2]
            self._counted_step = True
        if layer_idx in self.keys:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        else:
            self.keys[layer_idx] = key_states
            self.values[layer_idx] = value_states
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Cached length of ``layer_idx``; for layer 0 (the model-level query) the past length even when
        layer 0's frozen entry is absent because its route runs the grounding copy only."""
        if layer_idx in self.keys:
            return self.keys[layer_idx].shape[-2]
        return self._past_length if layer_idx == 0 else 0

    def get_usable_length(self, new_seq_length: int, layer_idx: int | None = 0) -> int:
        return self.get_seq_length(layer_idx)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.keys:
            raise KeyError(f"TwistCache holds no entry for layer {layer_idx}")
        return self.keys[layer_idx], self.values[layer_idx]

    def __iter__(self):
        for layer_idx in sorted(self.keys):
            yield self.keys[layer_idx], self.values[layer_idx]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer_idx in self.keys:
            device = self.keys[layer_idx].device
            self.keys[layer_idx] = self.keys[layer_idx].index_select(0, beam_idx.to(device))
            self.values[layer_idx] = self.values[layer_idx].index_select(0, beam_idx.to(device))
        if self.route is not None:
            self.route = self.route.index_select(0, beam_idx.to(self.route.device))

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        raise TypeError("a TwistCache holds grounding-expert entries that the legacy tuple format cannot carry")

    @classmethod
    def from_legacy(cls, past_key_values: Any) -> TwistCache:
        cache = cls()
        if past_key_values is not None:
            for layer_idx, (key_states, value_states) in enumerate(past_key_values):
                cache.keys[layer_idx] = key_states
                cache.values[layer_idx] = value_states
            cache.seen_tokens = cache._past_length = max((k.shape[-2] for k in cache.keys.values()), default=0)
        return cache

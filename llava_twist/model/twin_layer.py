"""The twin-expert decoder layer: the whole TWIST forward lives in this file.

The original module stays where it was, under its original parameter names (as peft's LoRA layer
keeps its base Linear); every new parameter sits under a ``twist_`` name. Per sample:

    frozen route:     out = frozen(x)                                   (the exact original computation)
    grounding route:  out = a * frozen(x) + (1 - a) * grounding(x)      (a: per-layer mix, may be 0)
    per-token gate:   out = (1 - g_t) * frozen(x) + g_t * grounding-route(x)   (ablation)

and, with ``twist_head``, the output layer: the grounding route's logits come from a copy of ``lm_head``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP

from llava_twist.model.config import TwistConfig
from llava_twist.model.routers import RouterKind
from llava_twist.model.routing import RouteContext
from llava_twist.model.rows_apart import RowLinear


class TwinMix(nn.Module):
    """The learned (or fixed) mix ``a`` and, for the per-token ablation, the gate."""

    def __init__(self, config: TwistConfig, router_kind: RouterKind) -> None:
        super().__init__()
        self.learned = config.twist_mix == "learned"
        self.fixed_value = config.twist_mix_init
        if self.learned:
            self.logit = nn.Parameter(torch.zeros(1))
        self._router_kind = router_kind
        self.gate = router_kind.build_gate()
        self.reset(config)

    def reset(self, config: TwistConfig) -> None:
        with torch.no_grad():
            if self.learned:
                p = min(max(config.twist_mix_init, 1e-4), 1 - 1e-4)
                self.logit.fill_(math.log(p / (1 - p)))
        if self.gate is not None:
            self._router_kind.reset_gate(self.gate)

    def uses_frozen(self) -> bool:
        """Whether the grounding route needs the frozen expert's output."""
        return self.learned or self.fixed_value != 0.0

    def reader(self) -> Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor] | None:
        """`grounding_route` when the grounding route reads the frozen expert's output, else None."""
        return self.grounding_route if self.uses_frozen() else None

    def grounding_route(self, frozen: torch.Tensor | None, grounding: torch.Tensor) -> torch.Tensor:
        if not self.uses_frozen():
            return grounding
        a = torch.sigmoid(self.logit).to(grounding.dtype) if self.learned else self.fixed_value
        return a * frozen + (1 - a) * grounding

    def combine(
        self, ctx: RouteContext, gate_input: torch.Tensor, frozen: torch.Tensor | None, grounding: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-sample selection between the frozen output and the grounding-route output."""
        if grounding is None:
            return frozen
        mixed = self.grounding_route(frozen, grounding)
        if self.gate is not None and ctx.token_gate:
            gate_logits = self.gate(gate_input).squeeze(-1)  # (B, T)
            ctx.gate_logits.append(gate_logits.float())
            g = torch.sigmoid(gate_logits).unsqueeze(-1).to(mixed.dtype)
            mixed = frozen + g * (mixed - frozen)
        if frozen is None or ctx.route is None:
            return mixed
        return torch.where(ctx.route.view(-1, 1, 1), mixed, frozen)


def _run_twins(
    ctx: RouteContext, mix: TwinMix, frozen_fn: Callable[[], Any], grounding_fn: Callable[[], Any]
) -> tuple[Any, Any]:
    """Run the experts the current route needs on the whole batch (both under ``compute_both``), to be selected
    per sample after; `_run_split` runs each on its own samples instead when the route allows."""
    some_frozen, some_grounding = ctx.needs()
    frozen = frozen_fn() if some_frozen or (some_grounding and (mix.uses_frozen() or mix.gate is not None)) else None
    grounding = grounding_fn() if some_grounding else None
    return frozen, grounding


RowsFn = Callable[[torch.Tensor | None], torch.Tensor]  # an expert run on some samples (None: all) of the batch


def _take(value: Any, rows: torch.Tensor | None, batch: int) -> Any:
    """``value``'s samples at ``rows`` when it is a per-sample tensor of the batch (dim 0 = ``batch``)."""
    if rows is None or not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        return value
    return value.index_select(0, rows)


def _run_split(
    ctx: RouteContext,
    grounding_route: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor] | None,
    batch: int,
    frozen_fn: RowsFn,
    grounding_fn: RowsFn,
) -> torch.Tensor | None:
    """Each expert on its own samples (`RouteContext.expert_rows`), merged back in batch order; None when the
    route does not split. ``grounding_route(frozen, out)`` mixes the frozen expert into the grounding route;
    None: the grounding expert alone.

    Both experts always run and enter the autograd graph, so that every ZeRO-3 rank gathers and reduces the
    same parameters in the same order (and DDP sees every parameter used): an expert with no sample of its own
    runs on one stand-in sample whose output counts zero times (FlashAttention refuses a batch of 0)."""
    rows = ctx.expert_rows(grounding_reads_frozen=grounding_route is not None)
    if rows is None:
        return None
    frozen_rows, grounding_rows = rows
    stand_in = grounding_rows.new_zeros(1)
    idle = []
    if frozen_rows is not None and frozen_rows.numel() == 0:
        idle.append(frozen_fn(stand_in))
        frozen = None
    else:
        frozen = frozen_fn(frozen_rows)
    if grounding_rows.numel() == 0:
        out = grounding_fn(stand_in)
        idle.append(out if frozen_rows is not None else grounding_route(frozen.index_select(0, stand_in), out))
        grounding = None
    else:
        grounding = grounding_fn(grounding_rows)
    if grounding is None:
        merged = frozen
    elif frozen_rows is None:
        mixed = grounding_route(frozen.index_select(0, grounding_rows), grounding)
        merged = frozen.index_copy(0, grounding_rows, mixed)
    elif frozen is None:
        merged = grounding
    else:
        merged = frozen.new_empty((batch, *frozen.shape[1:]))
        merged.index_copy_(0, frozen_rows, frozen)
        merged.index_copy_(0, grounding_rows, grounding)
    for out in idle:
        merged = merged + 0.0 * out.sum()
    return merged


class TwinExpertMLP(LlamaMLP):
    """A LlamaMLP (the frozen expert, original weights and names) with a grounding copy beside it."""

    def __init__(self, config: TwistConfig, ctx: RouteContext, router_kind: RouterKind) -> None:
        super().__init__(config)
        self.twist_expert = LlamaMLP(config)
        self.twist_mix = TwinMix(config, router_kind)
        self._ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        split = _run_split(self._ctx, self.twist_mix.reader(), batch,
                           lambda rows: super(TwinExpertMLP, self).forward(_take(x, rows, batch)),
                           lambda rows: self.twist_expert(_take(x, rows, batch)))
        if split is not None:
            return split
        frozen, grounding = _run_twins(self._ctx, self.twist_mix, lambda: super(TwinExpertMLP, self).forward(x),
                                       lambda: self.twist_expert(x))
        return self.twist_mix.combine(self._ctx, x, frozen, grounding)


class TwistDecoderLayer(LlamaDecoderLayer):
    """A LlamaDecoderLayer with a grounding expert: a copy of its FFN (``mlp``) or of the whole layer
    (``layer``: attention, FFN and norms; its KV entries live at ``layer_idx + num_hidden_layers``)."""

    def __init__(self, config: TwistConfig, layer_idx: int, ctx: RouteContext, is_router_layer: bool,
                 router_kind: RouterKind) -> None:
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        self.twist_kind = config.twist_expert
        self.is_router_layer = is_router_layer
        self._ctx = ctx
        if self.twist_kind == "mlp":
            self.mlp = TwinExpertMLP(config, ctx, router_kind)
        else:
            self.twist_expert = LlamaDecoderLayer(config, layer_idx + config.num_hidden_layers)
            self.twist_mix = TwinMix(config, router_kind)

    def grounding_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        """(frozen module, its grounding copy) pairs, for initialising the copy."""
        if self.twist_kind == "mlp":
            return [(self.mlp, self.mlp.twist_expert)]
        return [(self, self.twist_expert)]

    def mixes(self) -> list[TwinMix]:
        return [self.mlp.twist_mix] if self.twist_kind == "mlp" else [self.twist_mix]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_value: Any = None,
        output_attentions: bool | None = False,
        use_cache: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, ...]:
        if self.is_router_layer:
            self._ctx.decide(hidden_states)
        layer_args = (hidden_states, attention_mask, position_ids, past_key_value, output_attentions, use_cache)
        if self.twist_kind == "mlp":
            return super().forward(*layer_args, **kwargs)
        if past_key_value is None and not use_cache and not output_attentions:
            batch = hidden_states.shape[0]
            frozen_layer = super().forward

            def on_rows(layer: Callable[..., tuple[torch.Tensor, ...]]) -> RowsFn:
                return lambda rows: layer(*(_take(a, rows, batch) for a in layer_args),
                                          **{k: _take(v, rows, batch) for k, v in kwargs.items()})[0]

            split = _run_split(self._ctx, self.twist_mix.reader(), batch, on_rows(frozen_layer),
                               on_rows(self.twist_expert))
            if split is not None:
                return (split,)
        frozen, grounding = _run_twins(
            self._ctx,
            self.twist_mix,
            lambda: super(TwistDecoderLayer, self).forward(*layer_args, **kwargs),
            lambda: self.twist_expert(*layer_args, **kwargs),
        )
        hidden = self.twist_mix.combine(
            self._ctx, hidden_states, None if frozen is None else frozen[0], None if grounding is None else grounding[0]
        )
        return (hidden,) + (frozen if frozen is not None else grounding)[1:]


class TwistOutputHead(RowLinear):
    """``lm_head`` (original weight and name) with a grounding copy: the grounding route's logits come from the
    copy, the frozen route's from the original. For a base whose output rows never wrote the chains' words: the
    final norm fixes the hidden state's length, so frozen rows that training only pushed down cap how likely
    any twin layer can make those words (about e^-3.5 for the tiny base's ``Step``, ``the``, ``large``)."""

    def __init__(self, hidden_size: int, vocab_size: int, ctx: RouteContext) -> None:
        super().__init__(hidden_size, vocab_size, bias=False, ctx=ctx)
        self.twist_expert = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits per sample of the forward's route; outside a routed forward, the frozen head's."""
        route = self._ctx.route
        if route is None:
            return super().forward(hidden)
        batch = hidden.shape[0]
        split = _run_split(self._ctx, None, batch, lambda rows: super(TwistOutputHead, self).forward(
            _take(hidden, rows, batch)), lambda rows: self.twist_expert(_take(hidden, rows, batch)))
        if split is not None:
            return split
        some_frozen, some_grounding = self._ctx.needs()
        frozen = super().forward(hidden) if some_frozen else None
        grounding = self.twist_expert(hidden) if some_grounding else None
        if frozen is None or grounding is None:
            return frozen if grounding is None else grounding
        return torch.where(route.view(-1, 1, 1), grounding, frozen)

"""Router kinds: one class per value of ``twist_router``, built from the config by :func:`router_for`.

A kind owns its modules (the per-prompt head the model holds as ``model.twist_router``, the per-token gate each
twin mix holds as ``twist_mix.gate``: the parameter names checkpoints carry), its decision, its training loss and
its checks on the config, and says whether it decides (``auto``) or only takes forced routes, and whether it gates
each token. The model, the twin layers, the config and the trainer ask it; none of them names a kind.

A new kind is one subclass registered with :func:`register_router` (and its tests): ``twist_router=<its name>``
then builds, validates, trains and generates with it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from llava_twist.model.routes import Route
from llava_twist.model.routing import TwistRouter

GATE_BIAS = -4.0  # an untrained gate leaves every token (nearly) on the frozen expert


class RouterKind:
    """What a router kind decides and how it learns; one instance per model, made from its config."""

    name: ClassVar[str]
    decides: ClassVar[bool] = True  # ``auto`` takes its decision; False: every route must be forced
    gates: ClassVar[bool] = False  # a soft gate per token in every twin layer instead of one route per prompt
    learns: ClassVar[bool] = True  # it has weights trained through the decoder layers

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def per_prompt(self) -> bool:
        """Whether it makes one decision per prompt (:meth:`logits`, :meth:`decide`) in the router layer."""
        return self.decides and not self.gates

    def validate(self) -> None:
        """Raise ValueError naming the setting that this kind cannot work with."""

    def build_head(self) -> nn.Module | None:
        """The module that decides per prompt (the model's ``twist_router``), or None."""
        return None

    def build_gate(self) -> nn.Module | None:
        """The per-token gate of one twin mix (its ``gate``), or None."""
        return None

    def reset_head(self, head: nn.Module) -> None:
        """Fresh weights for an untrained head: every prompt on the frozen route."""

    def reset_gate(self, gate: nn.Module) -> None:
        """Fresh weights for an untrained gate."""

    def logits(self, head: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) grounding logits from the hidden states entering the router layer, pooled over ``mask``."""
        return head(hidden_states, mask)

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) bool: True takes the grounding route."""
        return torch.sigmoid(logits) > self.config.twist_router_threshold

    def loss(self, outputs: Any, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | None:
        """The router's training loss on the samples' task labels (1: grounding), or None."""
        return None


ROUTER_KINDS: dict[str, type[RouterKind]] = {}


def register_router(kind: type[RouterKind]) -> type[RouterKind]:
    """Make ``kind`` a value of ``twist_router`` (a class decorator)."""
    ROUTER_KINDS[kind.name] = kind
    return kind


def router_for(config: Any) -> RouterKind:
    """The router kind ``config.twist_router`` names; ValueError naming the setting and the kinds otherwise."""
    kind = ROUTER_KINDS.get(getattr(config, "twist_router", None))
    if kind is None:
        raise ValueError(f"twist_router={config.twist_router!r}: expected one of {tuple(ROUTER_KINDS)}")
    return kind(config)


@register_router
class PromptRouter(RouterKind):
    """One learned decision per prompt (the default): a probe on the pooled prompt, trained with BCE."""

    name = "prompt"

    def build_head(self) -> nn.Module:
        return TwistRouter(self.config.hidden_size, self.config.twist_router_hidden)

    def reset_head(self, head: nn.Module) -> None:
        head.reset()

    def loss(self, outputs: Any, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if outputs.router_logits is None:
            raise RuntimeError(
                f"the router produced no logits in training: twist_router_layer={self.config.twist_router_layer} "
                "must be a twin layer (or unset) so the router runs in the training pass"
            )
        device = outputs.router_logits.device
        return F.binary_cross_entropy_with_logits(outputs.router_logits, target.to(device),
                                                  weight=None if weight is None else weight.to(device))


@register_router
class TokenRouter(RouterKind):
    """A soft gate per token in every twin layer (an ablation that gives up exactness); each gate learns the
    sample's task label."""

    name = "token"
    gates = True

    def validate(self) -> None:
        if self.config.twist_head:
            raise ValueError("twist_head=True needs one route per prompt; the per-token gate (twist_router='token') "
                             "has none")

    def build_gate(self) -> nn.Module:
        return nn.Linear(self.config.hidden_size, 1)

    def reset_gate(self, gate: nn.Module) -> None:
        with torch.no_grad():
            nn.init.zeros_(gate.weight)
            gate.bias.fill_(GATE_BIAS)

    def loss(self, outputs: Any, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | None:
        if not outputs.gate_logits:
            return None
        gates = torch.stack(outputs.gate_logits)  # (layers, B, T)
        expanded = target.to(gates.device).view(1, -1, 1).expand_as(gates)
        if weight is not None:
            weight = weight.to(gates.device).view(1, -1, 1).expand_as(gates)
        return F.binary_cross_entropy_with_logits(gates, expanded, weight=weight)


@register_router
class NoRouter(RouterKind):
    """No router: every route is forced (the caller, or ``twist_route`` in the config, names it)."""

    name = "none"
    decides = False
    learns = False

    def validate(self) -> None:
        if Route.parse(self.config.twist_route, "twist_route") is Route.AUTO:
            raise ValueError("twist_router='none' needs a forced default route: set twist_route to frozen|grounding")

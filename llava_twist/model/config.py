"""`TwistConfig`: a LLaVA-1.5 config plus the TWIST settings, stored in ``config.json``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llava.model.language_model.llava_llama import LlavaConfig

from llava_twist.model.loss import StepWeights
from llava_twist.model.routes import ROUTES

TWIST_MODEL_TYPE = "llava_twist"
LAYER_PRESETS = ("all", "every_other")
EXPERT_KINDS = ("mlp", "layer")
MIX_KINDS = ("learned", "fixed")
ROUTER_KINDS = ("prompt", "token", "none")


class TwistConfig(LlavaConfig):
    """LLaVA-1.5 (Llama) config with TWIST twin-expert layers.

    Args:
        twist_layers: which decoder layers get a grounding expert: ``"all"``, ``"every_other"``
            (0, 2, 4, ...) or an explicit list of layer indices.
        twist_expert: what the grounding expert copies: ``"mlp"`` (the FFN) or ``"layer"`` (the whole
            decoder layer: attention, FFN, norms, with its own KV-cache entries).
        twist_mix: ``"learned"`` (a per-layer ``a = sigmoid(logit)``) or ``"fixed"``; the grounding route
            computes ``a * frozen(x) + (1 - a) * grounding(x)``.
        twist_mix_init: initial (or fixed) ``a`` in [0, 1]; 0 runs the grounding expert alone.
        twist_router: ``"prompt"`` (one learned decision per prompt, the default), ``"token"``
            (per-token soft gate in every twin layer, an ablation that gives up exactness) or ``"none"``
            (routes must be forced).
        twist_router_layer: index of the decoder layer whose *input* hidden states the router reads,
            pooled over the prompt's text after the image. ``None`` = the first twin layer (decided in the
            same pass); a later layer costs a second (frozen) prefill.
        twist_router_hidden: width of the router's hidden layer; 0 = a linear probe.
        twist_router_threshold: probability above which ``auto`` takes the grounding route.
        twist_router_loss_weight: weight of the router's BCE in the training loss.
        twist_step_weights: loss weight per chain span (``"answer:2"``, ``"1,1,2"``; see
            :class:`llava_twist.model.loss.StepWeights`); empty: every supervised token alike.
        twist_router_balance: weigh the router's BCE so that grounding and understanding prompts count equally in
            each batch, whatever the replay ratio (without it the majority task pulls the router's bias its way).
        twist_head: also give the output layer (``lm_head``) a grounding copy, used by the grounding route; for
            bases whose frozen output rows cannot reach the chains' words (see ``TwistOutputHead``).
        twist_route: the route ``forward``/``generate`` take when none is passed.
        twist_base_fingerprint: fingerprint of the base LLaVA weights a grounding delta applies onto.
    """

    model_type = TWIST_MODEL_TYPE

    def __init__(
        self,
        twist_layers: str | Sequence[int] = "every_other",
        twist_expert: str = "mlp",
        twist_mix: str = "learned",
        twist_mix_init: float = 0.5,
        twist_router: str = "prompt",
        twist_router_layer: int | None = None,
        twist_router_hidden: int = 0,
        twist_router_threshold: float = 0.5,
        twist_router_loss_weight: float = 1.0,
        twist_router_balance: bool = True,
        twist_step_weights: str = "",
        twist_head: bool = False,
        twist_route: str = "auto",
        twist_base_fingerprint: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.twist_layers = list(twist_layers) if not isinstance(twist_layers, str) else twist_layers
        self.twist_expert = twist_expert
        self.twist_mix = twist_mix
        self.twist_mix_init = float(twist_mix_init)
        self.twist_router = twist_router
        self.twist_router_layer = twist_router_layer
        self.twist_router_hidden = int(twist_router_hidden)
        self.twist_router_threshold = float(twist_router_threshold)
        self.twist_router_loss_weight = float(twist_router_loss_weight)
        self.twist_router_balance = bool(twist_router_balance)
        self.twist_step_weights = str(twist_step_weights or "")
        self.twist_head = bool(twist_head)
        self.twist_route = twist_route
        self.twist_base_fingerprint = twist_base_fingerprint
        super().__init__(**kwargs)
        self.validate_twist()

    def twin_layer_indices(self) -> list[int]:
        """Sorted indices of the decoder layers that get a grounding expert."""
        n = self.num_hidden_layers
        if self.twist_layers == "all":
            return list(range(n))
        if self.twist_layers == "every_other":
            return list(range(0, n, 2))
        return sorted(set(int(i) for i in self.twist_layers))

    def router_layer_index(self) -> int:
        layers = self.twin_layer_indices()
        return layers[0] if self.twist_router_layer is None else int(self.twist_router_layer)

    def validate_twist(self) -> None:
        """Raise ValueError naming the bad setting."""
        n = self.num_hidden_layers
        if isinstance(self.twist_layers, str):
            if self.twist_layers not in LAYER_PRESETS:
                raise ValueError(
                    f"twist_layers={self.twist_layers!r}: expected one of {LAYER_PRESETS} or a list of layer indices"
                )
        else:
            bad = [i for i in self.twist_layers if not isinstance(i, int) or not 0 <= i < n]
            if bad or not self.twist_layers:
                raise ValueError(
                    f"twist_layers={self.twist_layers}: indices must be integers in [0, {n - 1}] "
                    f"(the model has {n} decoder layers); out of range: {bad or 'empty list'}"
                )
        for name, value, allowed in (
            ("twist_expert", self.twist_expert, EXPERT_KINDS),
            ("twist_mix", self.twist_mix, MIX_KINDS),
            ("twist_router", self.twist_router, ROUTER_KINDS),
            ("twist_route", self.twist_route, ROUTES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}")
        if not 0.0 <= self.twist_mix_init <= 1.0:
            raise ValueError(f"twist_mix_init={self.twist_mix_init}: must lie in [0, 1]")
        if self.twist_router_layer is not None and not 0 <= int(self.twist_router_layer) < n:
            raise ValueError(f"twist_router_layer={self.twist_router_layer}: must lie in [0, {n - 1}]")
        if not 0.0 < self.twist_router_threshold < 1.0:
            raise ValueError(f"twist_router_threshold={self.twist_router_threshold}: must lie in (0, 1)")
        StepWeights.parse(self.twist_step_weights)  # names the flag and the bad item
        if self.twist_head and self.twist_router == "token":
            raise ValueError("twist_head=True needs one route per prompt; the per-token gate (twist_router='token') "
                             "has none")
        if self.twist_head and getattr(self, "pretraining_tp", 1) > 1:
            raise ValueError(f"twist_head=True needs pretraining_tp=1 (got {self.pretraining_tp})")
        if self.twist_router == "none" and self.twist_route == "auto":
            raise ValueError("twist_router='none' needs a forced default route: set twist_route to frozen|grounding")

    @classmethod
    def from_llava_config(cls, llava_config: LlavaConfig, **twist_kwargs: Any) -> TwistConfig:
        """A TWIST config for a LLaVA-1.5 (Llama) config, with the TWIST settings given."""
        data = llava_config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            data.pop(key, None)
        data.update(twist_kwargs)
        config = cls(**data)
        config.architectures = ["TwistLlavaLlamaForCausalLM"]
        return config

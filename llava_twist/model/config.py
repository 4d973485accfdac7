"""`TwistConfig`: a LLaVA-1.5 config plus the TWIST settings, stored in ``config.json``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llava.model.language_model.llava_llama import LlavaConfig

from llava_twist.model.loss import StepWeights
from llava_twist.model.routers import ROUTER_KINDS, router_for
from llava_twist.model.routes import Route

TWIST_MODEL_TYPE = "llava_twist"
LAYER_PRESETS = ("all", "every_other")
EXPERT_KINDS = ("mlp", "layer")
MIX_KINDS = ("learned", "fixed")


def _same(value: Any) -> Any:
    return value


def _layers(value: str | Sequence[int]) -> str | list[int]:
    return value if isinstance(value, str) else list(value)


@dataclass(frozen=True)
class TwistSetting:
    """One TWIST setting, declared once: its ``TwistConfig`` field (saved in ``config.json``), default and help.

    A setting users set (``user``) is also a training flag, ``--<name>`` taking a ``kind`` (see
    :mod:`llava_twist.train.arguments`), and a row of the README's settings table; the others are set by training
    or at inference. ``convert`` makes the stored value from a given one; ``choices`` are the values
    ``TwistConfig.validate_twist`` accepts."""

    name: str
    kind: type
    default: Any
    help: str
    user: bool = True
    convert: Callable[[Any], Any] = _same
    choices: tuple[str, ...] = ()


TWIST_SETTINGS: tuple[TwistSetting, ...] = (
    TwistSetting("twist_layers", str, "every_other", convert=_layers, help=(
        "which decoder layers get a grounding expert: all, every_other (0, 2, 4, ...) or a list of layer indices "
        "(on the command line: comma separated)")),
    TwistSetting("twist_expert", str, "mlp", choices=EXPERT_KINDS, help=(
        "what the grounding expert copies: mlp (the FFN) or layer (the whole decoder layer: attention, FFN, norms, "
        "with its own KV-cache entries)")),
    TwistSetting("twist_mix", str, "learned", choices=MIX_KINDS, help=(
        "the grounding route computes a * frozen(x) + (1 - a) * grounding(x), with a learned (a per-layer "
        "a = sigmoid(logit)) or fixed")),
    TwistSetting("twist_mix_init", float, 0.5, convert=float, help=(
        "initial (or fixed) a in [0, 1]; 0 runs the grounding expert alone")),
    TwistSetting("twist_router", str, "prompt", help=(
        f"the router kind ({', '.join(ROUTER_KINDS)}; llava_twist.model.routers): prompt (one learned decision per "
        "prompt), token (a per-token soft gate in every twin layer, an ablation that gives up exactness) or none "
        "(routes must be forced)")),
    TwistSetting("twist_router_layer", int, None, help=(
        "index of the decoder layer whose input hidden states the router reads, pooled over the prompt's text "
        "after the image; unset: the first twin layer (decided in the same pass), a later layer costs a second "
        "(frozen) prefill")),
    TwistSetting("twist_router_hidden", int, 0, convert=int, help=(
        "width of the router's hidden layer; 0: a linear probe")),
    TwistSetting("twist_router_threshold", float, 0.5, user=False, convert=float, help=(
        "router probability above which auto takes the grounding route")),
    TwistSetting("twist_router_loss_weight", float, 1.0, convert=float, help=(
        "weight of the router's BCE in the training loss")),
    TwistSetting("twist_router_balance", bool, True, convert=bool, help=(
        "weigh the router's BCE so that grounding and understanding prompts count equally in each batch, whatever "
        "the replay ratio (without it the majority task pulls the router's bias its way)")),
    TwistSetting("twist_step_weights", str, "", convert=lambda value: str(value or ""), help=(
        "loss weight per chain span: '1,1,2' (steps in order), 'answer:2', 'steps:0.5', 'last:3' (each chain's "
        "deciding step; see llava_twist.model.loss.StepWeights); empty: every supervised token alike")),
    TwistSetting("twist_head", bool, False, convert=bool, help=(
        "also give the output layer (lm_head) a grounding copy, used by the grounding route; for bases whose "
        "frozen output rows cannot reach the chains' words (see TwistOutputHead)")),
    TwistSetting("twist_route", str, Route.AUTO.value, user=False,
                 convert=lambda value: Route.parse(value, "twist_route").value, help=(
        "the route forward/generate take when none is passed")),
    TwistSetting("twist_base_fingerprint", str, None, user=False, help=(
        "fingerprint of the base LLaVA weights a grounding delta applies onto (set by training)")),
)
USER_SETTINGS = tuple(setting for setting in TWIST_SETTINGS if setting.user)
_SETTINGS = {setting.name: setting for setting in TWIST_SETTINGS}


class TwistConfig(LlavaConfig):
    """LLaVA-1.5 (Llama) config with TWIST twin-expert layers.

    Each setting of :data:`TWIST_SETTINGS` (there with its default and meaning) is a keyword argument and an
    attribute of the same name, stored through the setting's ``convert`` wherever it is set.
    ``twist_step_weights`` is parsed where it is set; the loss reads the parsed weights, ``step_weights``."""

    model_type = TWIST_MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        for setting in TWIST_SETTINGS:
            setattr(self, setting.name, kwargs.pop(setting.name, setting.default))
        super().__init__(**kwargs)
        self.validate_twist()

    def __setattr__(self, key: str, value: Any) -> None:
        setting = _SETTINGS.get(key)
        if setting is not None:
            value = setting.convert(value)
        super().__setattr__(key, value)
        if key == "twist_step_weights":
            super().__setattr__("_step_weights", StepWeights.parse(value))  # names the flag and the bad item

    @property
    def step_weights(self) -> StepWeights:
        """``twist_step_weights``, parsed."""
        return self._step_weights

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_step_weights", None)
        return out

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
        for setting in TWIST_SETTINGS:
            value = getattr(self, setting.name)
            if setting.choices and value not in setting.choices:
                raise ValueError(f"{setting.name}={value!r}: expected one of {setting.choices}")
        if not 0.0 <= self.twist_mix_init <= 1.0:
            raise ValueError(f"twist_mix_init={self.twist_mix_init}: must lie in [0, 1]")
        if self.twist_router_layer is not None and not 0 <= int(self.twist_router_layer) < n:
            raise ValueError(f"twist_router_layer={self.twist_router_layer}: must lie in [0, {n - 1}]")
        if not 0.0 < self.twist_router_threshold < 1.0:
            raise ValueError(f"twist_router_threshold={self.twist_router_threshold}: must lie in (0, 1)")
        if self.twist_head and getattr(self, "pretraining_tp", 1) > 1:
            raise ValueError(f"twist_head=True needs pretraining_tp=1 (got {self.pretraining_tp})")
        router_for(self).validate()

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

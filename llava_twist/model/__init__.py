"""TWIST model: config, twin-expert layers, model classes (registered with the Auto classes), builder."""

from llava_twist.model.config import TWIST_MODEL_TYPE, TwistConfig
from llava_twist.model.modeling import (
    TwistCausalLMOutput,
    TwistLlavaLlamaForCausalLM,
    TwistLlavaLlamaModel,
    is_twist_param,
)
from llava_twist.model.routing import RouteDecision, TwistCache
from llava_twist.model.twin_layer import TwinExpertMLP, TwistDecoderLayer

__all__ = [
    "TWIST_MODEL_TYPE",
    "RouteDecision",
    "TwinExpertMLP",
    "TwistCache",
    "TwistCausalLMOutput",
    "TwistConfig",
    "TwistDecoderLayer",
    "TwistLlavaLlamaForCausalLM",
    "TwistLlavaLlamaModel",
    "is_twist_param",
]

"""Grounding experts as LoRA (``--twist_lora_r``): the expert copies stay frozen at the frozen experts'
weights and train only through low-rank adapters (peft), for small GPUs. Deltas are saved merged, under
the plain TWIST names, so they load without peft."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from llava_twist.model.builder import twist_state_dict
from llava_twist.model.modeling import is_twist_param

ADAPTER = "default"
TWIST_LORA_TARGETS = (r".*\.twist_expert\.(?:.*\.)?(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                      r"|lm_head\.twist_expert")


def add_twist_lora(model: nn.Module, r: int, alpha: int, dropout: float) -> list[str]:
    """Put LoRA adapters on every Linear of the grounding experts; returns the adapted module names."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TWIST_LORA_TARGETS, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not adapted:
        raise ValueError("--twist_lora_r: the model has no grounding-expert Linear layers to adapt")
    return adapted


def is_twist_lora_trainable(name: str) -> bool:
    """LoRA adapters, mixes and router train; the expert copies' own weights do not."""
    return is_twist_param(name) and (".twist_expert." not in f".{name}." or ".lora_" in name)


def freeze_for_twist_lora(model: nn.Module) -> tuple[int, int]:
    """Only LoRA adapters, mixes and router train. Returns (trainable, total) parameter counts."""
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_twist_lora_trainable(name))
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


@torch.no_grad()
def merged_twist_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The TWIST weights with each adapter merged into its expert Linear (``W + scaling * B @ A``), under the
    names a TWIST model without LoRA has. Gathers under ZeRO-3: call on every rank."""
    state = twist_state_dict(model)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = state.pop(f"{name}.base_layer.weight")
        lora_a = state.pop(f"{name}.lora_A.{ADAPTER}.weight").float()
        lora_b = state.pop(f"{name}.lora_B.{ADAPTER}.weight").float()
        state[f"{name}.weight"] = (base.float() + (lora_b @ lora_a) * module.scaling[ADAPTER]).to(base.dtype)
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state

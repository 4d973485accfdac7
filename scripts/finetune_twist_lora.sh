#!/usr/bin/env bash
# TWIST with LoRA grounding experts, for small GPUs: each grounding expert stays frozen at its copy of the
# frozen expert and trains through LoRA adapters (peft) on its Linear layers; mixes and router train fully.
# Saved deltas have the adapters merged, so they load like any TWIST delta (no peft needed):
#   load_pretrained_model(OUT, MODEL, ...) / --model-path OUT --model-base MODEL.
# Same environment variables as finetune_twist.sh (multi-node via HOSTFILE too), plus LORA_R / LORA_ALPHA;
# LLaVA's LoRA recipe values (r 128, alpha 256, lr 2e-4). --twist_save_full is not available in this mode.
set -euo pipefail
cd "$(dirname "$0")/.."

export OUT=${OUT:-./checkpoints/llava-v1.5-7b-twist-lora}
export LR=${LR:-2e-4}
LORA_R=${LORA_R:-128}
LORA_ALPHA=${LORA_ALPHA:-256}

exec bash scripts/finetune_twist.sh --twist_lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_dropout 0.05 "$@"

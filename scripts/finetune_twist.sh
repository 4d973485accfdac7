#!/usr/bin/env bash
# TWIST fine-tuning of LLaVA-1.5 with DeepSpeed ZeRO-3: only the grounding experts, their mixes and the
# router train (LLaVA-1.5's finetune.sh recipe otherwise). Data: SCOUT grounding records (task "grounding")
# mixed with replayed LLaVA instruction records (understanding; e.g. `python -m scout_data mix ...`).
#
# Every path is an environment variable; extra arguments go to the trainer (e.g. --twist_expert layer):
#   MODEL=liuhaotian/llava-v1.5-7b DATA=./playground/data/scout/scout_mix.json IMAGES=./playground/data \
#   OUT=./checkpoints/llava-v1.5-7b-twist bash scripts/finetune_twist.sh --twist_save_full True
#
# Output: OUT holds the grounding-only delta (twist_delta.safetensors + config.json), loadable with
#   llava_twist.model.builder.load_pretrained_model(OUT, MODEL, ...) / --model-path OUT --model-base MODEL;
# with --twist_save_full True also a full checkpoint in OUT/llava-v1.5-full: TWIST for our loader, the original
# model for LLaVA's (llava.model.builder, llava.eval.run_llava). Re-running resumes from OUT/checkpoint-*.
#
# Multi-node: list the machines in a hostfile ("node1 slots=8" per line), make this repository and the data
# reachable at the same path on every node (passwordless ssh between them, as DeepSpeed's launcher requires), and
#   HOSTFILE=./hostfile MASTER_ADDR=node1 bash scripts/finetune_twist.sh
# which runs `deepspeed --hostfile HOSTFILE --master_addr MASTER_ADDR --master_port MASTER_PORT ...`; keep the
# global batch (nodes x GPUS x BATCH x GRAD_ACC) at LLaVA's 128.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-liuhaotian/llava-v1.5-7b}
DATA=${DATA:-./playground/data/scout/scout_mix.json}
IMAGES=${IMAGES:-./playground/data}
OUT=${OUT:-./checkpoints/llava-v1.5-7b-twist}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
DS_CONFIG=${DS_CONFIG:-./scripts/zero3.json}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-16}
GRAD_ACC=${GRAD_ACC:-1}
LR=${LR:-2e-5}
ROUTER_LR=${ROUTER_LR:-1e-3}
SAVE_STEPS=${SAVE_STEPS:-1000}
REPORT_TO=${REPORT_TO:-wandb}
ENTRY=${ENTRY:-llava_twist/train/train_mem.py}  # train_twist.py without flash-attn
LAUNCH=(deepspeed)
if [[ -n "${HOSTFILE:-}" ]]; then
    LAUNCH+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR with HOSTFILE}" \
             --master_port "${MASTER_PORT:-29500}")
elif [[ -n "${GPUS:-}" ]]; then
    LAUNCH+=(--num_gpus "$GPUS")
fi

source scripts/_launcher.sh
run_launcher "${LAUNCH[@]}" "$ENTRY" \
    --deepspeed "$DS_CONFIG" \
    --model_name_or_path "$MODEL" \
    --version v1 \
    --data_path "$DATA" \
    --image_folder "$IMAGES" \
    --vision_tower "$VISION_TOWER" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$BATCH" \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps "$GRAD_ACC" \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit 1 \
    --learning_rate "$LR" \
    --twist_router_lr "$ROUTER_LR" \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to "$REPORT_TO" \
    "$@"

#!/usr/bin/env bash
# TWIST fine-tuning on CPU: the real DeepSpeed launcher with 2 processes (gloo), fp32, ZeRO-3, a tiny LLaVA-1.5.
# Used by the tests and the demo. Settings come from the environment; extra arguments are passed on, e.g.
#   MODEL=checkpoints/tiny-llava DATA=scout.json IMAGES=scout_images OUT=checkpoints/twist-cpu STEPS=20 \
#       bash scripts/finetune_twist_cpu.sh --twist_save_full True
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-checkpoints/tiny-llava}
DATA=${DATA:-playground/data/scout/train.json}
IMAGES=${IMAGES:-playground/data/scout/images}
OUT=${OUT:-checkpoints/twist-tiny-cpu}
STEPS=${STEPS:-20}
BATCH=${BATCH:-2}
LR=${LR:-1e-3}
SAVE_STEPS=${SAVE_STEPS:-10}
NPROC=${NPROC:-2}
DS_CONFIG=${DS_CONFIG:-scripts/zero3.json}
DEEPSPEED=${DEEPSPEED:-deepspeed}
PORT=${MASTER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# DeepSpeed's CPU all-reduce maps a 67 MB buffer per process in /dev/shm and never unlinks it: remove this run's
# (they are named after the user, master address and port), or every run leaks them until the machine reboots.
remove_shm_buffers() { rm -f /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*_"$PORT"_[0-9]*; }
trap remove_shm_buffers EXIT

export CUDA_VISIBLE_DEVICES=""  # the CPU launcher: on a GPU host its cards stay out of it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}

source scripts/_launcher.sh
status=0
run_launcher "$DEEPSPEED" --num_gpus "$NPROC" --master_port "$PORT" llava_twist/train/train_twist.py \
    --deepspeed "$DS_CONFIG" \
    --ddp_backend gloo \
    --model_name_or_path "$MODEL" \
    --version v1 \
    --data_path "$DATA" \
    --image_folder "$IMAGES" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length False \
    --output_dir "$OUT" \
    --max_steps "$STEPS" \
    --per_device_train_batch_size "$BATCH" \
    --gradient_accumulation_steps 1 \
    --save_strategy steps \
    --save_steps "$SAVE_STEPS" \
    --learning_rate "$LR" \
    --weight_decay 0. \
    --warmup_ratio 0 \
    --lr_scheduler_type constant \
    --logging_steps 1 \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 0 \
    --lazy_preprocess True \
    --report_to none \
    --seed 0 \
    "$@" || status=$?
exit "$status"

#!/bin/bash
# LLaVA-1.5's benchmark suite under lmms-eval's task names (VQAv2, GQA, VizWiz, ScienceQA-IMG, TextVQA, POPE, MME,
# MMBench, MM-Vet, and RefCOCO/+/g REC), run on the base (lmms-eval's own `--model llava`) and on the TWIST checkpoint
# (`--model llava_twist`), then the retention table: python -m llava_twist.eval.summary "$OUT".
# Needs the hub (lmms-eval downloads each benchmark) and, for MMBench and MM-Vet, lmms-eval's GPT judge
# (OPENAI_API_KEY). Env: CKPT, MODEL_PATH (a TWIST checkpoint or grounding-only delta), MODEL_BASE (the LLaVA-1.5 it
# was trained from: the base run, and a delta's base), ROUTE (auto | frozen | grounding), TASKS, BATCH_SIZE,
# NUM_PROCESSES (one per GPU, through accelerate launch), OUT, PYTHON.
set -e
PYTHON=${PYTHON:-python}
CKPT=${CKPT:-llava-v1.5-7b-twist}
MODEL_PATH=${MODEL_PATH:-./checkpoints/$CKPT}
MODEL_BASE=${MODEL_BASE:-liuhaotian/llava-v1.5-7b}
ROUTE=${ROUTE:-auto}
TASKS=${TASKS:-vqav2_val,gqa,vizwiz_vqa_val,scienceqa_img,textvqa_val,pope,mme,mmbench_en_dev,mmvet,refcoco_bbox_rec_val,refcoco+_bbox_rec_val,refcocog_bbox_rec_val}
OUT=${OUT:-./playground/data/eval/lmms_eval/$CKPT}
NUM_PROCESSES=${NUM_PROCESSES:-1}

$PYTHON -m llava_twist.lmms  # exits 2, naming the install, when lmms-eval is missing
if [ "$NUM_PROCESSES" -gt 1 ]; then
    LAUNCH=($PYTHON -m accelerate.commands.launch --num_processes "$NUM_PROCESSES" -m lmms_eval)
else
    LAUNCH=($PYTHON -m lmms_eval)
fi
TWIST_ARGS="pretrained=$MODEL_PATH,twist_route=$ROUTE"
if [ -f "$MODEL_PATH/twist_delta.safetensors" ]; then
    TWIST_ARGS="$TWIST_ARGS,model_base=$MODEL_BASE"
fi

run() {
    local name=$1 model=$2 model_args=$3
    "${LAUNCH[@]}" --model "$model" --model_args "$model_args" --tasks "$TASKS" --batch_size "${BATCH_SIZE:-1}" \
        --log_samples --output_path "$OUT/$name"
}

run base llava "pretrained=$MODEL_BASE"
run "twist-$ROUTE" llava_twist "$TWIST_ARGS"
$PYTHON -m llava_twist.eval.summary "$OUT"

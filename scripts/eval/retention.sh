#!/bin/bash
# Retention ("no forgetting"): the same LLaVA model_vqa question file answered by base LLaVA (the plain
# LlavaLlamaForCausalLM of the checkpoint, or of MODEL_BASE for a grounding delta) and by TWIST with the
# auto route; identical-answer rate, accuracy delta where the question file has ground truth, router decisions.
# QUESTION_FILE / IMAGE_FOLDER default to LLaVA's POPE layout; any model_vqa question file works.
set -e
source "$(dirname "$0")/_chunks.sh"
CKPT=${CKPT:-llava-v1.5-7b-twist}
MODEL_PATH=${MODEL_PATH:-./checkpoints/$CKPT}
EVAL=./playground/data/eval/retention
QUESTION_FILE=${QUESTION_FILE:-./playground/data/eval/pope/llava_pope_test.jsonl}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/eval/pope/val2014}
SPLIT=${SPLIT:-$(basename "$QUESTION_FILE" .jsonl)}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}

run_chunks "$QUESTION_FILE" "$IMAGE_FOLDER" "$EVAL/answers/$SPLIT/$CKPT-base" --model-class llava --model-id "$CKPT-base"
run_chunks "$QUESTION_FILE" "$IMAGE_FOLDER" "$EVAL/answers/$SPLIT/$CKPT" --route auto
$PYTHON -m llava_twist.eval.eval_retention \
    --question-file "$QUESTION_FILE" \
    --base-answers "$EVAL/answers/$SPLIT/$CKPT-base/merge.jsonl" \
    --twist-answers "$EVAL/answers/$SPLIT/$CKPT/merge.jsonl" \
    --result-file "$EVAL/answers/$SPLIT/$CKPT/retention.result.json" \
    --name "$CKPT $SPLIT"

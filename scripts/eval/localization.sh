#!/bin/bash
# Zero-shot localisation: find-all queries on COCO-format data, pycocotools AP (confidence from token
# probabilities) and recall. Question file from the SCOUT converter (scout-data coco --tasks find_all ...;
# python -m llava_twist.eval.scout_questions ... -> localization.jsonl) at
# ./playground/data/eval/localization/$SPLIT.jsonl; images under ./playground/data/eval/localization/val2017.
set -e
source "$(dirname "$0")/_chunks.sh"
CKPT=${CKPT:-llava-v1.5-7b-twist}
MODEL_PATH=${MODEL_PATH:-./checkpoints/$CKPT}
EVAL=./playground/data/eval/localization
SPLIT=${SPLIT:-coco_val2017_find_all}

run_chunks "$EVAL/$SPLIT.jsonl" "${IMAGE_FOLDER:-$EVAL/val2017}" "$EVAL/answers/$SPLIT/$CKPT/${ROUTE:-auto}" --route "${ROUTE:-auto}"
$PYTHON -m llava_twist.eval.eval_localization \
    --question-file "$EVAL/$SPLIT.jsonl" \
    --answers-file "$EVAL/answers/$SPLIT/$CKPT/${ROUTE:-auto}/merge.jsonl" \
    --name "$CKPT $SPLIT"

#!/bin/bash
# Referring-expression comprehension on RefCOCO / RefCOCO+ / RefCOCOg: Acc@0.5, mean IoU, parse failures.
# Question files (one per split) come from the SCOUT converters:
#   scout-data refcoco --refs-dir .../refcoco --out DIR && python -m llava_twist.eval.scout_questions \
#       --scout-json DIR/testA.json --out-dir tmp && mv tmp/refexp.jsonl ./playground/data/eval/refcoco/refcoco_testA.jsonl
# Images: COCO train2014 under ./playground/data/eval/refcoco/train2014.
set -e
source "$(dirname "$0")/_chunks.sh"
CKPT=${CKPT:-llava-v1.5-7b-twist}
MODEL_PATH=${MODEL_PATH:-./checkpoints/$CKPT}
EVAL=./playground/data/eval/refcoco
SPLITS=${SPLITS:-"refcoco_val refcoco_testA refcoco_testB refcoco+_val refcoco+_testA refcoco+_testB refcocog_val refcocog_test"}

for SPLIT in $SPLITS; do
    [ -f "$EVAL/$SPLIT.jsonl" ] || { echo "skip $SPLIT: no $EVAL/$SPLIT.jsonl"; continue; }
    run_chunks "$EVAL/$SPLIT.jsonl" "$EVAL/train2014" "$EVAL/answers/$SPLIT/$CKPT" --route "${ROUTE:-auto}"
    $PYTHON -m llava_twist.eval.eval_refexp \
        --question-file "$EVAL/$SPLIT.jsonl" \
        --answers-file "$EVAL/answers/$SPLIT/$CKPT/merge.jsonl" \
        --name "$CKPT $SPLIT"
done

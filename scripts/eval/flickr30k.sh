#!/bin/bash
# Grounded captioning on Flickr30k Entities: phrase recall at IoU 0.5.
# Question file from the SCOUT converter: scout-data flickr30k ... --out DIR, then
#   python -m llava_twist.eval.scout_questions --scout-json DIR/test.json --out-dir tmp
#   mv tmp/grounded_caption.jsonl ./playground/data/eval/flickr30k/flickr30k_test.jsonl
set -e
source "$(dirname "$0")/_chunks.sh"
CKPT=${CKPT:-llava-v1.5-7b-twist}
MODEL_PATH=${MODEL_PATH:-./checkpoints/$CKPT}
EVAL=./playground/data/eval/flickr30k
SPLIT=${SPLIT:-flickr30k_test}

run_chunks "$EVAL/$SPLIT.jsonl" "$EVAL/flickr30k-images" "$EVAL/answers/$SPLIT/$CKPT/${ROUTE:-auto}" --route "${ROUTE:-auto}"
$PYTHON -m llava_twist.eval.eval_grounded_caption \
    --question-file "$EVAL/$SPLIT.jsonl" \
    --answers-file "$EVAL/answers/$SPLIT/$CKPT/${ROUTE:-auto}/merge.jsonl" \
    --name "$CKPT $SPLIT"

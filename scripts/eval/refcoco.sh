#!/bin/bash
# Referring-expression comprehension on RefCOCO / RefCOCO+ / RefCOCOg: Acc@0.5, mean IoU, parse failures.
# PROMPT: scout (the question file's step-by-step prompt, default), llava (LLaVA-1.5's REC prompt, what a base
# LLaVA-1.5 was trained with) or lmms-eval (their prompt). PROTOCOL: ours (default) or lmms-eval (their scoring
# rule; with PROMPT=lmms-eval the numbers compare with lmms-eval's published RefCOCO table). ROUTE: auto,
# grounding or frozen. Answers go to answers/SPLIT/CKPT/ROUTE-PROMPT/ so no run reuses another's.
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
ROUTE=${ROUTE:-auto}
PROMPT=${PROMPT:-scout}
PROTOCOL=${PROTOCOL:-ours}

for SPLIT in $SPLITS; do
    [ -f "$EVAL/$SPLIT.jsonl" ] || { echo "skip $SPLIT: no $EVAL/$SPLIT.jsonl"; continue; }
    ANSWERS=$EVAL/answers/$SPLIT/$CKPT/$ROUTE-$PROMPT
    run_chunks "$EVAL/$SPLIT.jsonl" "$EVAL/train2014" "$ANSWERS" --route "$ROUTE" --prompt "$PROMPT"
    $PYTHON -m llava_twist.eval.eval_refexp \
        --question-file "$EVAL/$SPLIT.jsonl" \
        --answers-file "$ANSWERS/merge.jsonl" \
        --result-file "$ANSWERS/$PROTOCOL.result.json" \
        --protocol "$PROTOCOL" \
        --name "$CKPT $SPLIT $ROUTE $PROMPT"
done

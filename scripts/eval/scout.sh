#!/bin/bash
# Every benchmark on SCOUT held-out data (e.g. the synthetic test split): converts SCOUT_JSON to question
# files, answers them, scores them, retention on its qa questions, and writes the summary table + chart.
#   SCOUT_JSON=./playground/data/scout/synthetic/test.json IMAGE_FOLDER=./playground/data/scout/synthetic/images \
#   MODEL_PATH=./checkpoints/tiny-twist bash scripts/eval/scout.sh
# OVERWRITE=1 replaces question files in EVAL that the converter did not write (a rerun replaces its own).
set -e
source "$(dirname "$0")/_chunks.sh"
CKPT=${CKPT:-llava-v1.5-7b-twist}
MODEL_PATH=${MODEL_PATH:-./checkpoints/$CKPT}
SCOUT_JSON=${SCOUT_JSON:-./playground/data/scout/synthetic/test.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-$(dirname "$SCOUT_JSON")/images}
EVAL=${EVAL:-./playground/data/eval/scout}

$PYTHON -m llava_twist.eval.scout_questions --scout-json "$SCOUT_JSON" --out-dir "$EVAL" ${LIMIT:+--limit "$LIMIT"} ${OVERWRITE:+--overwrite}
declare -A SCORER=([refexp]=eval_refexp [grounded_caption]=eval_grounded_caption [localization]=eval_localization)
for BENCH in refexp grounded_caption localization; do
    [ -f "$EVAL/$BENCH.jsonl" ] || continue
    run_chunks "$EVAL/$BENCH.jsonl" "$IMAGE_FOLDER" "$EVAL/answers/$BENCH/$CKPT/${ROUTE:-auto}" --route "${ROUTE:-auto}"
    $PYTHON -m llava_twist.eval.${SCORER[$BENCH]} \
        --question-file "$EVAL/$BENCH.jsonl" \
        --answers-file "$EVAL/answers/$BENCH/$CKPT/${ROUTE:-auto}/merge.jsonl" \
        --name "$CKPT scout-$BENCH"
done
if [ -f "$EVAL/vqa.jsonl" ]; then
    run_chunks "$EVAL/vqa.jsonl" "$IMAGE_FOLDER" "$EVAL/answers/vqa/$CKPT-base" --model-class llava --model-id "$CKPT-base"
    run_chunks "$EVAL/vqa.jsonl" "$IMAGE_FOLDER" "$EVAL/answers/vqa/$CKPT" --route auto
    $PYTHON -m llava_twist.eval.eval_retention \
        --question-file "$EVAL/vqa.jsonl" \
        --base-answers "$EVAL/answers/vqa/$CKPT-base/merge.jsonl" \
        --twist-answers "$EVAL/answers/vqa/$CKPT/merge.jsonl" \
        --result-file "$EVAL/answers/vqa/$CKPT/retention.result.json" \
        --name "$CKPT scout-vqa"
fi
$PYTHON -m llava_twist.eval.summary "$EVAL" --out "$EVAL/summary"

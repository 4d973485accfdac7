#!/bin/bash
# Sourced by the eval scripts: answer a question file with one process per GPU (LLaVA's sharding loop),
# then merge the chunks.  run_chunks QUESTION_FILE IMAGE_FOLDER ANSWER_DIR [extra model_grounding flags...]
# writes ANSWER_DIR/merge.jsonl.  Env: CUDA_VISIBLE_DEVICES (one chunk per listed GPU), PYTHON, BATCH_SIZE,
# MAX_NEW_TOKENS, DEVICE (cuda | cpu | auto).
set -e
PYTHON=${PYTHON:-python}
gpu_list="${CUDA_VISIBLE_DEVICES:-0}"
IFS=',' read -ra GPULIST <<< "$gpu_list"
CHUNKS=${#GPULIST[@]}

run_chunks() {
    local question_file=$1 image_folder=$2 answer_dir=$3
    shift 3
    mkdir -p "$answer_dir"
    local pids=()
    for IDX in $(seq 0 $((CHUNKS-1))); do
        CUDA_VISIBLE_DEVICES=${GPULIST[$IDX]} $PYTHON -m llava_twist.eval.model_grounding \
            --model-path "$MODEL_PATH" \
            ${MODEL_BASE:+--model-base "$MODEL_BASE"} \
            --question-file "$question_file" \
            --image-folder "$image_folder" \
            --answers-file "$answer_dir/${CHUNKS}_${IDX}.jsonl" \
            --num-chunks "$CHUNKS" \
            --chunk-idx "$IDX" \
            --temperature 0 \
            --conv-mode "${CONV_MODE:-vicuna_v1}" \
            --batch-size "${BATCH_SIZE:-8}" \
            --max_new_tokens "${MAX_NEW_TOKENS:-512}" \
            --device "${DEVICE:-auto}" \
            "$@" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    local output_file=$answer_dir/merge.jsonl
    > "$output_file"
    for IDX in $(seq 0 $((CHUNKS-1))); do
        cat "$answer_dir/${CHUNKS}_${IDX}.jsonl" >> "$output_file"
    done
}

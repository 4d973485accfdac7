#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (not run in CI; the project's venv installed, no hub needed):
#   smoke     the gpu demo profile's stages at the ci recipe's sizes (bf16, DeepSpeed on the GPU);
#   step      two bf16 ZeRO-3 TWIST training steps on a LLaVA-1.5-7B-shaped model with random weights, as many decoder
#             layers as the planner says fit in 80% of the GPU, the planner's prediction beside the measured peak
#             (scripts/gpu_zero3_step.py);
#   overhead  the overhead benchmark (TWIST's routes against LLaVA) on the GPU in bf16.
# Each part has a time limit (4, 3 and 2 minutes: under 10 in all). Logs go to OUT (default ./gpu-check).
#   bash scripts/gpu_check.sh    # PARTS=smoke,step,overhead STEP_BATCH=4 STEP_LENGTH=1024 EXPERT=mlp LAYERS=every_other
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./gpu-check}
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python
PARTS=${PARTS:-smoke,step,overhead}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"

smoke() {
    timeout 240 "$PY" - "$OUT/demo" > "$OUT/smoke.log" 2>&1 <<'PYTHON'
import dataclasses, sys
from playground.miniature.cli import run_demo
from playground.miniature.recipe import get_recipe

recipe = dataclasses.replace(get_recipe("ci"), profile="gpu-smoke", device="cuda", twist_nproc=1)
print(f"{len(run_demo(recipe, sys.argv[1], progress=False))} stages")
PYTHON
    local rc=$?
    tail -n 5 "$OUT/smoke.log"
    return $rc
}

step() {
    timeout 180 "$PY" -m deepspeed.launcher.runner --num_gpus 1 scripts/gpu_zero3_step.py --out "$OUT" \
        --batch "${STEP_BATCH:-4}" --length "${STEP_LENGTH:-1024}" --twist_expert "${EXPERT:-mlp}" \
        --twist_layers "${LAYERS:-every_other}" > "$OUT/zero3_step.log" 2>&1
    local rc=$?
    grep '^{' "$OUT/zero3_step.log" | tail -n 1 | tee "$OUT/zero3_step.json"
    [[ $rc -eq 0 ]] || tail -n 20 "$OUT/zero3_step.log"
    return $rc
}

overhead() {
    timeout 120 "$PY" scripts/bench_twist_overhead.py --device cuda --dtype bfloat16 > "$OUT/overhead.log" 2>&1
    local rc=$?
    tail -n 12 "$OUT/overhead.log"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || exit 1
status=0
summary=()
for part in smoke step overhead; do
    [[ ",$PARTS," == *",$part,"* ]] || continue
    echo "== $part"
    "$part"
    rc=$?
    summary+=("$part $rc")
    [[ $rc -eq 0 ]] || status=1
done
echo "== exit status per part (0 = ok): ${summary[*]}; logs in $OUT"
exit $status

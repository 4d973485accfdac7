#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (not run in CI; the project's venv installed, no hub needed):
#   1. the gpu demo profile's stages at the ci recipe's sizes (bf16, DeepSpeed on the GPU): a smoke run;
#   2. two bf16 ZeRO-3 TWIST training steps on a LLaVA-1.5-7B-shaped model with random weights, with as many decoder
#      layers as the planner says fit in 80% of the GPU, and the planner's prediction beside the measured peak;
#   3. the overhead benchmark (TWIST's routes against LLaVA) on the GPU in bf16.
# Everything goes to OUT (default ./gpu-check); a summary is printed at the end.
#   bash scripts/gpu_check.sh            # STEP_BATCH=4 STEP_LENGTH=1024 EXPERT=mlp LAYERS=every_other by default
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./gpu-check}
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python
STEP_BATCH=${STEP_BATCH:-4}
STEP_LENGTH=${STEP_LENGTH:-1024}
EXPERT=${EXPERT:-mlp}
LAYERS=${LAYERS:-every_other}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.__version__)" \
    || exit 1

echo "== 1. the gpu profile's stages at ci sizes"
timeout 420 "$PY" - "$OUT/demo" <<'EOF' > "$OUT/smoke.log" 2>&1
import dataclasses, sys
from playground.miniature.cli import run_demo
from playground.miniature.recipe import get_recipe

recipe = dataclasses.replace(get_recipe("ci"), profile="gpu-smoke", device="cuda", twist_nproc=1)
results = run_demo(recipe, sys.argv[1], progress=False)
print(f"{len(results)} stages")
EOF
smoke=$?
tail -n 5 "$OUT/smoke.log"
[[ $smoke -eq 0 ]] || status=1

echo "== 2. a bf16 ZeRO-3 TWIST step on a 7B-shaped model"
free_gib=$("$PY" -c "import torch; print(torch.cuda.mem_get_info()[0] / 2**30)")
layers=""
for n in 32 24 16 12 8 6 4 2; do
    cfg="$OUT/llava-7b-$n/config.json"
    mkdir -p "$(dirname "$cfg")"
    "$PY" - "$cfg" "$n" <<'EOF'
import json, sys
# liuhaotian/llava-v1.5-7b's config.json, with fewer decoder layers
config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu", "hidden_size": 4096,
          "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
          "num_hidden_layers": int(sys.argv[2]), "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "pretraining_tp": 1, "image_aspect_ratio": "pad", "mm_hidden_size": 1024,
          "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
          "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "use_mm_proj": True,
          "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
json.dump(config, open(sys.argv[1], "w"), indent=2)
EOF
    planned=$("$PY" -m llava_twist.plan --model-path "$cfg" --gpus 1 --batch-per-gpu "$STEP_BATCH" \
        --max-length "$STEP_LENGTH" --twist_expert "$EXPERT" --twist_layers "$LAYERS" --json \
        | "$PY" -c "import json, sys; print(json.load(sys.stdin)['per_gpu_bytes']['total'] / 2**30)")
    if "$PY" -c "import sys; sys.exit(0 if $planned <= 0.8 * $free_gib else 1)"; then
        layers=$n
        break
    fi
done
if [[ -z "$layers" ]]; then
    echo "not even 2 layers fit in 80% of the GPU's free $free_gib GiB"
    status=1
else
    echo "$layers layers: the planner says $planned GiB of $free_gib GiB free"
    timeout 300 "$PY" -m deepspeed.launcher.runner --num_gpus 1 scripts/gpu_zero3_step.py \
        --config "$OUT/llava-7b-$layers/config.json" --batch "$STEP_BATCH" --length "$STEP_LENGTH" \
        --twist_expert "$EXPERT" --twist_layers "$LAYERS" > "$OUT/zero3_step.log" 2>&1
    step=$?
    grep '^{' "$OUT/zero3_step.log" | tail -n 1 | tee "$OUT/zero3_step.json"
    [[ $step -eq 0 ]] || { tail -n 20 "$OUT/zero3_step.log"; status=1; }
fi

echo "== 3. the overhead benchmark"
timeout 240 "$PY" scripts/bench_twist_overhead.py --device cuda --dtype bfloat16 > "$OUT/overhead.log" 2>&1
bench=$?
tail -n 12 "$OUT/overhead.log"
[[ $bench -eq 0 ]] || status=1

echo "== summary: smoke $smoke, zero3 step ${step:-not run}, overhead $bench (0 = ok); logs in $OUT"
exit $status

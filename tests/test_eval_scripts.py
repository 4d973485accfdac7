"""The scripts/eval/*.sh wrappers: syntax, one chunk per GPU with LLaVA's sharding loop, merge, scoring."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts" / "eval").glob("*.sh"))

STUB = """#!/bin/bash
echo "GPU=$CUDA_VISIBLE_DEVICES $*" >> "$STUB_LOG"
if [ "$2" = llava_twist.eval.model_grounding ]; then
    while [ $# -gt 0 ]; do
        case $1 in --answers-file) out=$2;; --chunk-idx) idx=$2;; esac
        shift
    done
    echo "{\\"question_id\\": $idx}" > "$out"
fi
"""


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def run_script(name: str, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    stub = tmp_path / "python-stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    full_env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), "CKPT": "ckpt", **env}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "eval" / name)], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_refcoco_shards_over_gpus_merges_and_scores(tmp_path):
    data = tmp_path / "playground" / "data" / "eval" / "refcoco"
    data.mkdir(parents=True)
    (data / "refcoco_val.jsonl").write_text("{}\n")
    proc, calls = run_script("refcoco.sh", tmp_path, CUDA_VISIBLE_DEVICES="3,5", SPLITS="refcoco_val refcoco_testA")
    assert proc.returncode == 0, proc.stderr
    assert "skip refcoco_testA" in proc.stdout
    runs = sorted(c for c in calls if "model_grounding" in c)
    assert len(runs) == 2
    assert runs[0].startswith("GPU=3 ") and "--num-chunks 2 --chunk-idx 0" in runs[0]
    assert runs[1].startswith("GPU=5 ") and "--num-chunks 2 --chunk-idx 1" in runs[1]
    assert all("--route auto --prompt scout" in r for r in runs)
    answers = data / "answers" / "refcoco_val" / "ckpt" / "auto-scout"
    merged = [json.loads(line) for line in (answers / "merge.jsonl").read_text().splitlines()]
    assert merged == [{"question_id": 0}, {"question_id": 1}]
    where = "./playground/data/eval/refcoco/answers/refcoco_val/ckpt/auto-scout"
    assert calls[-1].endswith(f"--answers-file {where}/merge.jsonl --result-file {where}/ours.result.json "
                              "--protocol ours --name ckpt refcoco_val auto scout")
    assert "llava_twist.eval.eval_refexp" in calls[-1]


def test_refcoco_keeps_each_route_and_prompt_apart_and_scores_lmms_evals_way(tmp_path):
    data = tmp_path / "playground" / "data" / "eval" / "refcoco"
    data.mkdir(parents=True)
    (data / "refcoco_val.jsonl").write_text("{}\n")
    proc, calls = run_script("refcoco.sh", tmp_path, SPLITS="refcoco_val", ROUTE="grounding", PROMPT="lmms-eval",
                             PROTOCOL="lmms-eval")
    assert proc.returncode == 0, proc.stderr
    assert "--route grounding --prompt lmms-eval" in calls[0]
    assert (data / "answers" / "refcoco_val" / "ckpt" / "grounding-lmms-eval" / "merge.jsonl").is_file()
    assert "--protocol lmms-eval" in calls[-1] and "lmms-eval.result.json" in calls[-1]


def test_retention_runs_base_and_twist_then_compares(tmp_path):
    proc, calls = run_script("retention.sh", tmp_path, QUESTION_FILE="q.jsonl", IMAGE_FOLDER="imgs",
                             MODEL_PATH="ck", MODEL_BASE="base")
    assert proc.returncode == 0, proc.stderr
    base, twist, score = calls
    assert "--model-class llava --model-id ckpt-base" in base and "--model-base base" in base
    assert "--route auto" in twist and "--model-class" not in twist
    assert "llava_twist.eval.eval_retention" in score and "--base-answers" in score and "--twist-answers" in score


@pytest.mark.parametrize("delta", [False, True])
def test_lmms_eval_runs_the_base_and_twist_then_the_retention_table(tmp_path, delta):
    (tmp_path / "ck").mkdir()
    if delta:
        (tmp_path / "ck" / "twist_delta.safetensors").write_bytes(b"")
    proc, calls = run_script("lmms_eval.sh", tmp_path, MODEL_PATH="ck", MODEL_BASE="base",
                             TASKS="pope,refcoco_bbox_rec_val", OUT="out")
    assert proc.returncode == 0, proc.stderr
    check, base, twist, summary = calls
    assert check.endswith("-m llava_twist.lmms")
    assert "-m lmms_eval --model llava --model_args pretrained=base --tasks pope,refcoco_bbox_rec_val" in base
    assert "--log_samples --output_path out/base" in base
    twist_args = "pretrained=ck,twist_route=auto" + (",model_base=base" if delta else "")
    assert f"-m lmms_eval --model llava_twist --model_args {twist_args} --tasks" in twist
    assert "--output_path out/twist-auto" in twist
    assert summary.endswith("-m llava_twist.eval.summary out")


def test_lmms_eval_launches_one_process_per_gpu(tmp_path):
    proc, calls = run_script("lmms_eval.sh", tmp_path, MODEL_PATH="ck", NUM_PROCESSES="4", ROUTE="frozen")
    assert proc.returncode == 0, proc.stderr
    assert all("-m accelerate.commands.launch --num_processes 4 -m lmms_eval" in c for c in calls[1:3])
    assert "twist_route=frozen" in calls[2]

"""LLaVA's own trainer through `llava_twist.train.train_llava`: a LoRA run is reproducible from its `--seed`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_twist.train.train_llava import DEFAULT_SEED, seed_of

sys.path.insert(0, str(Path(__file__).parent))
from twist_train_data import write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_seed_is_read_as_llavas_trainer_reads_it() -> None:
    assert seed_of(["--lora_enable", "True", "--seed", "7"]) == 7
    assert seed_of(["--seed=3", "--output_dir", "x"]) == 3
    assert seed_of(["--output_dir", "x"]) == DEFAULT_SEED == 42


def lora_run(model: Path, data: Path, images: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    """One step of LLaVA's LoRA fine-tuning; the adapters it saved."""
    tower = json.loads((model / "config.json").read_text())["mm_vision_tower"]
    args = ["--model_name_or_path", str(model), "--version", "v1", "--data_path", str(data),
            "--image_folder", str(images), "--vision_tower", tower, "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
            "--image_aspect_ratio", "pad", "--output_dir", str(out), "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--save_strategy", "no",
            "--model_max_length", "512", "--dataloader_num_workers", "0", "--lazy_preprocess", "True",
            "--report_to", "none", "--bf16", "False", "--fp16", "False", "--lora_enable", "True", "--lora_r", "4",
            "--lora_alpha", "8", "--seed", str(seed)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "llava_twist.train.train_llava", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    saved = sorted(out.glob("adapter_model.*"))
    assert saved, sorted(p.name for p in out.iterdir())
    if saved[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(saved[0]))
    return torch.load(saved[0], map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("lora")
    data, images = write_dataset(root / "data", n_grounding=2, n_understanding=2)
    return {name: lora_run(tiny_llava, data, images, root / name, seed)
            for name, seed in (("first", 0), ("again", 0), ("other_seed", 1))}


@pytest.mark.slow
def test_two_lora_runs_with_one_seed_train_the_same_adapters(runs: dict[str, dict[str, torch.Tensor]]) -> None:
    first, again = runs["first"], runs["again"]
    assert first and set(first) == set(again) and any("lora_A" in name for name in first)
    for name, tensor in first.items():
        assert torch.equal(again[name], tensor), name


@pytest.mark.slow
def test_the_adapters_start_from_the_seed(runs: dict[str, dict[str, torch.Tensor]]) -> None:
    lora_a = [name for name in runs["first"] if "lora_A" in name]
    assert not all(torch.equal(runs["first"][n], runs["other_seed"][n]) for n in lora_a)

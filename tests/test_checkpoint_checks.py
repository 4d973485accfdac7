"""A checkpoint is checked at the boundary before it loads (llava_twist.model.checks): each bad checkpoint below,
given to a command (run as ``cli_checks.run_module`` runs it), stops it with exit status 2 and one line on stderr
naming the file and the problem, no traceback, every file of the checkpoint byte-identical and no output written.
A new case is one line in CASES and, if it needs a new kind of damage, one function."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from cli_checks import assert_one_line, run_module  # noqa: E402

TOWER = "clip-vision-tower"


def set_config(**fields: object) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return damage


def set_tower_config(**fields: object) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / TOWER / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return damage


def write(name: str, content: bytes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).write_bytes(content)
    return damage


def truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return damage


def other_tokenizer(folder: Path) -> None:
    """The tokenizer of another model: 800 pieces where the embeddings have 640 rows."""
    from llava_twist.tiny import default_corpus, train_tokenizer

    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    train_tokenizer(folder, default_corpus(), 800)


def delta_tensor_to_int64(folder: Path) -> None:
    path = folder / "twist_delta.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    first = sorted(state)[0]
    state[first] = state[first].to(torch.int64)
    save_file(state, str(path), metadata=metadata)


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path], None]
    named: str  # the file the error must name, relative to the damaged folder
    message: str  # a piece of the one-line error
    delta: bool = False  # damage a TWIST delta (applied with --model-base the tiny LLaVA) instead of the checkpoint
    full: bool = False  # damage a full TWIST checkpoint (learned mix, every layer a twin) instead
    cli: str = "serve"  # serve.cli, eval.model_grounding (grounding) or train.train_twist (train)
    extra: tuple[str, ...] = ()


CASES = [
    Case("fewer layers in config than weights", set_config(num_hidden_layers=2), "config.json",
         "num_hidden_layers 2 disagrees with the weights"),
    Case("fewer layers, plain LLaVA class", set_config(num_hidden_layers=2), "config.json",
         "num_hidden_layers 2 disagrees with the weights", cli="grounding", extra=("--model-class", "llava")),
    Case("hidden width", set_config(hidden_size=32, num_attention_heads=4), "config.json",
         "hidden_size 32 disagrees with the weights"),
    Case("intermediate width", set_config(intermediate_size=256), "config.json",
         "intermediate_size 256 disagrees with the weights", cli="grounding"),
    Case("vocab size vs embedding rows", set_config(vocab_size=700), "config.json",
         "vocab_size 700 disagrees with the weights: model.embed_tokens.weight is [640, 64]"),
    Case("key-value heads", set_config(num_key_value_heads=2), "config.json", "num_key_value_heads 2"),
    Case("projector input width", set_config(mm_hidden_size=48), "config.json",
         "mm_hidden_size 48 disagrees with the weights: model.mm_projector.0.weight is [64, 32]"),
    Case("fewer layers, training", set_config(num_hidden_layers=2), "config.json",
         "num_hidden_layers 2 disagrees with the weights", cli="train"),
    Case("tokenizer of another model", other_tokenizer, "tokenizer.model",
         "the tokenizer has 800 tokens (with the image tokens the config adds) but the model's embeddings 640 rows"),
    Case("tokenizer of another model, training", other_tokenizer, "tokenizer.model",
         "the tokenizer has 800 tokens", cli="train"),
    Case("empty weights", write("model.safetensors", b""), "model.safetensors",
         "not a whole safetensors file (empty"),
    Case("truncated weights", truncate("model.safetensors"), "model.safetensors",
         "not a whole safetensors file", cli="grounding"),
    Case("empty tower weights", write(f"{TOWER}/model.safetensors", b""), f"{TOWER}/model.safetensors",
         "not a whole safetensors file (empty"),
    Case("truncated tower weights", truncate(f"{TOWER}/model.safetensors"), f"{TOWER}/model.safetensors",
         "not a whole safetensors file"),
    Case("config a JSON list", write("config.json", b"[1, 2]"), "config.json",
         "expected a JSON object of settings, got a JSON list"),
    Case("hidden_size a string", set_config(hidden_size="64"), "config.json",
         "hidden_size '64' is not a positive integer", cli="grounding"),
    Case("empty tokenizer.model", write("tokenizer.model", b""), "tokenizer.model", "empty file"),
    Case("unknown image_aspect_ratio", set_config(image_aspect_ratio="weird"), "config.json",
         "image_aspect_ratio 'weird' is not one LLaVA knows"),
    Case("empty delta", write("twist_delta.safetensors", b""), "twist_delta.safetensors",
         "not a whole safetensors file (empty", delta=True),
    Case("truncated delta", truncate("twist_delta.safetensors"), "twist_delta.safetensors",
         "not a whole safetensors file", delta=True, cli="grounding"),
    Case("int64 tensor in a delta", delta_tensor_to_int64, "twist_delta.safetensors",
         "weights must be floating point", delta=True),
    # the fourth sweep: the config check knows every field, the weights must match the config exactly
    Case("full TWIST checkpoint listing fewer twin layers", set_config(twist_layers=[0, 1, 2]), "config.json",
         "disagrees with the weights, which hold 4 tensors it has no place for (its twist_layers", full=True),
    Case("fixed mix on a learned-mix checkpoint", set_config(twist_mix="fixed"), "config.json",
         "tensors it has no place for (its twist_layers, twist_mix", full=True, cli="grounding"),
    Case("a typo in a twist_ key", set_config(twist_mix_inti=0.0), "config.json",
         "unknown field 'twist_mix_inti' (did you mean 'twist_mix_init'?)", full=True),
    Case("an unknown field of a LLaVA checkpoint", set_config(mm_vision_select_layr=-1), "config.json",
         "unknown field 'mm_vision_select_layr' (did you mean 'mm_vision_select_layer'?)"),
    Case("vision select layer past the tower", set_config(mm_vision_select_layer=99), "config.json",
         "mm_vision_select_layer 99 is not one of the vision tower's 3 hidden states"),
    Case("vision select feature unknown", set_config(mm_vision_select_feature="weird"), "config.json",
         "mm_vision_select_feature 'weird' is not one LLaVA knows (patch, cls_patch)", cli="grounding"),
    Case("tower images smaller than its patches", set_tower_config(image_size=8), f"{TOWER}/config.json",
         "image_size 8 is smaller than patch_size 14"),
    Case("an unknown projector", set_config(mm_projector_type="mlp2x_relu"), "config.json",
         "mm_projector_type 'mlp2x_relu' is not one LLaVA builds"),
]


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sources(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llava_twist.model.builder import convert_llava_to_twist, save_twist_checkpoint, save_twist_delta
    from llava_twist.model.checks import load_tokenizer

    root = tmp_path_factory.mktemp("checkpoint-checks")
    (root / "images").mkdir()
    Image.new("RGB", (40, 30), (90, 90, 90)).save(root / "images" / "0.png")
    (root / "q.jsonl").write_text(json.dumps({"question_id": "q0", "image": "0.png", "text": "Where?"}) + "\n")
    (root / "train.json").write_text(json.dumps([{"id": "g0", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhere is the red circle?"},
        {"from": "gpt", "value": "Answer: [0.10, 0.20, 0.30, 0.40]"}]}]))
    twist = convert_llava_to_twist(tiny_llava, twist_layers="all")
    delta = save_twist_delta(twist, root / "delta")
    full = save_twist_checkpoint(twist, root / "full", load_tokenizer(tiny_llava))
    return {"model": tiny_llava, "delta": delta, "full": full, "root": root}


def copy_checkpoint(source: Path, to: Path) -> Path:
    """A copy of a checkpoint folder whose config points at its own copy of the vision tower."""
    shutil.copytree(source, to)
    config = json.loads((to / "config.json").read_text())
    if (to / TOWER).is_dir():
        config["mm_vision_tower"] = str(to / TOWER)
        (to / "config.json").write_text(json.dumps(config))
    return to


def run_cli(
    case: Case, model_path: Path, model_base: Path | None, root: Path, output: Path
) -> subprocess.CompletedProcess:
    base = ["--model-base", str(model_base)] if model_base else []
    if case.cli == "serve":
        argv = ["llava_twist.serve.cli", "--model-path", str(model_path), *base, "--image-file",
                str(root / "images" / "0.png"), "--query", "Where?", "--max-new-tokens", "2", "--device", "cpu"]
    elif case.cli == "train":
        argv = ["llava_twist.train.train_twist", "--model_name_or_path", str(model_path), "--image_folder",
                str(root / "images"), "--data_path", str(root / "train.json"), "--output_dir", str(output),
                "--version", "v1", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
                "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad",
                "--report_to", "none", "--max_steps", "1"]
    else:
        argv = ["llava_twist.eval.model_grounding", "--model-path", str(model_path), *base, "--question-file",
                str(root / "q.jsonl"), "--image-folder", str(root / "images"), "--answers-file", str(output),
                "--device", "cpu"]
    return run_module([*argv, *case.extra], cwd=root, env={"WORLD_SIZE": "1"})


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_checkpoint_is_one_line_naming_the_file(case: Case, sources: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_checkpoint(sources["delta" if case.delta else "full" if case.full else "model"],
                             tmp_path / "checkpoint")
    case.damage(folder)
    base = copy_checkpoint(sources["model"], tmp_path / "base") if case.delta else None
    before = {p: tree_bytes(p) for p in (folder, base) if p is not None}
    output = tmp_path / ("out" if case.cli == "train" else "answers.jsonl")
    proc = run_cli(case, folder, base, sources["root"], output)
    assert_one_line(proc, str(folder / case.named), case.message)
    assert {p: tree_bytes(p) for p in before} == before
    assert not output.exists()


def test_a_delta_is_not_a_base(sources: dict[str, Path], tmp_path: Path) -> None:
    """``--model-path DELTA --model-base DELTA`` said only ``cannot load model delta: 'TwistConfig'``."""
    delta = copy_checkpoint(sources["delta"], tmp_path / "delta")
    before = tree_bytes(delta)
    proc = run_cli(Case("delta as base", set_config(), "", ""), delta, delta, sources["root"], tmp_path / "a.jsonl")
    assert_one_line(proc, f"{delta}: holds no model weights, only ['twist_delta.safetensors']",
                    "a base must be a full checkpoint: the plain LLaVA-1.5 checkpoint")
    assert tree_bytes(delta) == before


def test_pytorch_bin_weights_are_checked_after_loading(sources: dict[str, Path], tmp_path: Path) -> None:
    """A folder of ``.bin`` weights has no header to read first: weights left over after loading are refused."""
    folder = copy_checkpoint(sources["model"], tmp_path / "bin")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    set_config(num_hidden_layers=2)(folder)
    proc = run_cli(CASES[0], folder, None, sources["root"], tmp_path / "a.jsonl")
    assert_one_line(proc, str(folder / "config.json"), "disagrees with the weights, which hold 18 tensors")


def test_good_checkpoints_pass_every_check(sources: dict[str, Path], tmp_path: Path) -> None:
    from llava_twist.model.builder import DELTA_WEIGHTS
    from llava_twist.model.checks import (
        check_checkpoint_weights,
        check_tokenizer_fits,
        load_tokenizer,
        read_checkpoint_config,
        read_delta,
    )

    config = read_checkpoint_config(sources["model"])
    check_checkpoint_weights(sources["model"], config)
    check_tokenizer_fits(load_tokenizer(sources["model"]), config["vocab_size"], sources["model"])
    stamped, state = read_delta(sources["delta"] / DELTA_WEIGHTS)
    assert stamped and state
    for ratio in ("pad", "square", None):
        folder = copy_checkpoint(sources["model"], tmp_path / str(ratio))
        set_config(image_aspect_ratio=ratio)(folder)
        assert read_checkpoint_config(folder)["image_aspect_ratio"] == ratio


def test_training_refuses_an_image_aspect_ratio_the_loader_would(sources: dict[str, Path], tmp_path: Path) -> None:
    case = Case("weird ratio", set_config(), "", "", cli="train", extra=("--image_aspect_ratio", "weird"))
    proc = run_cli(case, sources["model"], None, sources["root"], tmp_path / "out")
    assert_one_line(proc, "--image_aspect_ratio: image_aspect_ratio 'weird' is not one LLaVA knows")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_as_llava_v1_5_was_released_loads_as_twist_and_as_llava(sources: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """liuhaotian/llava-v1.5-7b's config.json says ``"model_type": "llava"`` (it predates LLaVA's ``llava_llama``):
    both loaders take it, and TWIST's experts start as exact copies (the grounding route answers as the frozen)."""
    from llava_twist.serve.inference import GenerationSettings, generate, load_model

    folder = tmp_path / "llava-v1.5-released"
    shutil.copytree(sources["model"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    image = Image.open(sources["root"] / "images" / "0.png")
    twist = load_model(str(folder), device="cpu")
    answers = {route: generate(twist, ["Where is it?"], [image], GenerationSettings(max_new_tokens=6, route=route))[0]
               for route in ("frozen", "grounding")}
    assert answers["frozen"].text == answers["grounding"].text
    plain = load_model(str(folder), device="cpu", model_class="llava")
    assert generate(plain, ["Where is it?"], [image], GenerationSettings(max_new_tokens=6))[0].text == answers[
        "frozen"].text

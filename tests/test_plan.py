"""The planner (``python -m llava_twist.plan``): counts on LLaVA-1.5-7B/13B-shaped TWIST models built on the meta
device equal the closed-form counts; its model states equal DeepSpeed's estimator where every parameter trains;
the delta size is the file training writes; bad input is one line."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from cli_checks import assert_one_line, run_module

PLAN = "llava_twist.plan"
# LLaVA-1.5's released configs (liuhaotian/llava-v1.5-7b, -13b), the fields that decide shapes
LLAVA_V15 = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40},
}
VOCAB, MM_HIDDEN = 32000, 1024
CLIP_L = {"hidden": 1024, "intermediate": 4096, "layers": 24, "image": 336, "patch": 14}


def write_llava_config(folder: Path, size: str, **overrides: object) -> Path:
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu", "vocab_size": VOCAB,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "pretraining_tp": 1,
        "image_aspect_ratio": "pad", "mm_hidden_size": MM_HIDDEN, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "use_mm_proj": True,
        **LLAVA_V15[size], **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


# ---- closed forms


def llama_layer(h: int, i: int) -> int:
    return 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms


def llava_base(size: str) -> int:
    s = LLAVA_V15[size]
    h, i, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    language = 2 * VOCAB * h + n * llama_layer(h, i) + h  # embeddings, lm_head, layers, final norm
    projector = MM_HIDDEN * h + h + h * h + h  # mlp2x_gelu
    c, ci, positions = CLIP_L["hidden"], CLIP_L["intermediate"], (CLIP_L["image"] // CLIP_L["patch"]) ** 2 + 1
    clip_layer = 4 * (c * c + c) + (c * ci + ci) + (ci * c + c) + 2 * 2 * c
    tower = 3 * CLIP_L["patch"] ** 2 * c + c + positions * c + 2 * c + CLIP_L["layers"] * clip_layer + 2 * c
    return language + projector + tower


def twins(size: str, layers: str) -> int:
    n = LLAVA_V15[size]["num_hidden_layers"]
    return n if layers == "all" else len(range(0, n, 2))


def expected(size: str, expert: str, layers: str, head: bool = False, lora_r: int = 0) -> dict[str, int]:
    s = LLAVA_V15[size]
    h, i = s["hidden_size"], s["intermediate_size"]
    k = twins(size, layers)
    copy = 3 * h * i if expert == "mlp" else llama_layer(h, i)
    router, mixes = h + 1, k
    experts = k * copy + (VOCAB * h if head else 0)
    linears = [(h, i), (h, i), (i, h)] + ([(h, h)] * 4 if expert == "layer" else [])
    lora = k * sum(lora_r * (a + b) for a, b in linears) + (lora_r * (h + VOCAB) if head else 0)
    total = llava_base(size) + experts + router + mixes + lora
    trainable = (lora if lora_r else experts) + router + mixes
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "router": router, "mixes": mixes,
            "lora": lora, "delta": experts + router + mixes}


def plan_json(*argv: str) -> dict:
    proc = run_module([PLAN, *argv, "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


CASES = [
    ("7b", "mlp", "every_other", False, 0),
    ("7b", "mlp", "all", False, 0),
    ("7b", "layer", "every_other", False, 0),
    ("7b", "layer", "all", True, 0),
    ("7b", "mlp", "every_other", False, 64),
    ("13b", "mlp", "every_other", False, 0),
    ("13b", "layer", "all", False, 0),
    ("13b", "layer", "every_other", True, 16),
]


@pytest.mark.parametrize(("size", "expert", "layers", "head", "lora_r"), CASES)
def test_counts_are_the_closed_form(tmp_path: Path, size: str, expert: str, layers: str, head: bool,
                                    lora_r: int) -> None:
    config = write_llava_config(tmp_path / size, size)
    plan = plan_json("--model-path", str(config), "--twist_expert", expert, "--twist_layers", layers,
                     "--twist_head", str(head), "--twist_lora_r", str(lora_r))
    want = expected(size, expert, layers, head, lora_r)
    assert {k: plan["parameters"][k] for k in want} == want
    assert plan["twist"]["twin_layers"] == twins(size, layers)
    assert plan["vision_tower"]["assumed_clip_vit_l_336"]


def test_every_other_mlp_twins_on_the_7b_add_the_issue_s_count(tmp_path: Path) -> None:
    plan = plan_json("--model-path", str(write_llava_config(tmp_path, "7b")))
    assert plan["parameters"]["delta"] - plan["parameters"]["router"] - plan["parameters"]["mixes"] == 2_164_260_864


def test_nothing_is_allocated_and_training_s_freezing_applies(tmp_path: Path) -> None:
    from llava_twist.model.builder import twist_config_for
    from llava_twist.model.modeling import is_twist_param
    from llava_twist.plan import build_twist_model, vision_tower_config

    write_llava_config(tmp_path, "13b")
    config = twist_config_for(tmp_path, twist_expert="layer", twist_layers="all")
    model = build_twist_model(config, vision_tower_config(config.mm_vision_tower, MM_HIDDEN))
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    assert all(p.is_meta for p in model.buffers())
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if is_twist_param(n)}
    assert any(n.startswith("model.vision_tower.vision_tower.") for n in params)


def _deepspeed_printed(total: int, largest: int, gpus: int, nodes: int) -> dict[str, tuple[float, float]]:
    """DeepSpeed's own table, as ``estimate_zero3_model_states_mem_needs_all_cold`` prints it: options -> GB."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus, num_nodes=nodes)
    rows = {}
    for line in out.getvalue().splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", line)
        if m:
            rows[re.sub(r"\s+|OffloadDeviceEnum\.", "", m.group(3))] = (float(m.group(1)), float(m.group(2)))
    return rows


@pytest.mark.parametrize(("size", "gpus", "nodes"), [("7b", 8, 1), ("13b", 8, 2)])
def test_all_trainable_model_states_are_deepspeed_s(tmp_path: Path, size: str, gpus: int, nodes: int) -> None:
    config = str(write_llava_config(tmp_path, size))
    printed = None
    for offload, options in (("--zero3", "offload_param=none,offload_optimizer=none,zero_init=1"),
                             ("--zero3-offload", "offload_param=cpu,offload_optimizer=cpu,zero_init=1")):
        plan = plan_json("--model-path", config, "--all-trainable", "--gpus", str(gpus), "--nodes", str(nodes),
                         offload)
        p, g = plan["parameters"], plan["per_gpu_bytes"]
        assert p["frozen"] == 0 and p["trainable"] == p["total"]
        printed = printed or _deepspeed_printed(p["total"], p["largest_trainable"], gpus, nodes)
        cpu_gb, gpu_gb = printed[options]
        states = g["trainable_states"] + g["frozen_shards"] + g["gathered"]
        assert round(states / 2**30, 2) == gpu_gb
        assert round(plan["cpu_bytes_per_node"] / 2**30, 2) == cpu_gb


def test_frozen_parameters_cost_their_16_bit_shards_only(tmp_path: Path) -> None:
    config = str(write_llava_config(tmp_path, "7b"))
    plan = plan_json("--model-path", config, "--gpus", "4", "--nodes", "2")
    everything = plan_json("--model-path", config, "--gpus", "4", "--nodes", "2", "--all-trainable")
    p, g = plan["parameters"], plan["per_gpu_bytes"]
    assert g["frozen_shards"] == int(2 * p["frozen"] / 8)
    assert g["trainable_states"] == int(18 * p["trainable"] / 8)
    assert g["total"] < everything["per_gpu_bytes"]["total"]
    offload = plan_json("--model-path", config, "--gpus", "4", "--nodes", "2", "--zero3-offload")
    assert offload["per_gpu_bytes"]["frozen_shards"] == 0 == offload["per_gpu_bytes"]["trainable_states"]
    assert offload["cpu_bytes_per_node"] == int(18 * p["trainable"] / 2 * 1.5) + int(2 * p["frozen"] / 2 * 1.5)


def test_activations_follow_batch_length_and_checkpointing(tmp_path: Path) -> None:
    config = str(write_llava_config(tmp_path, "7b"))

    def activations(*argv: str) -> int:
        return plan_json("--model-path", config, *argv)["per_gpu_bytes"]["activations"]

    base = activations("--batch-per-gpu", "4", "--max-length", "1024")
    assert activations("--batch-per-gpu", "8", "--max-length", "1024") == 2 * base
    assert activations("--batch-per-gpu", "4", "--max-length", "2048") == 2 * base
    assert activations("--batch-per-gpu", "4", "--max-length", "1024", "--gradient-checkpointing", "False") > 2 * base
    assert activations("--batch-per-gpu", "4", "--max-length", "1024", "--twist_expert", "layer") > base


def test_buffers_resolve_auto_from_the_hidden_size(tmp_path: Path) -> None:
    plan = plan_json("--model-path", str(write_llava_config(tmp_path, "13b")))
    d = plan["deepspeed"]
    assert d["reduce_bucket_size"] == 5120 * 5120
    assert d["stage3_prefetch_bucket_size"] == int(0.9 * 5120 * 5120)
    assert d["stage3_param_persistence_threshold"] == 10 * 5120
    assert plan["per_gpu_bytes"]["buffer_prefetch_bucket"] == 2 * d["stage3_prefetch_bucket_size"]


def test_a_tiny_checkpoint_s_plan_matches_the_real_model_and_delta(tiny_llava: Path, tmp_path: Path) -> None:
    """On a real (tiny) checkpoint with its local vision tower: the meta counts are the loaded model's, and the
    delta size is the file training writes in bf16."""
    import torch

    from llava_twist.model.builder import DELTA_WEIGHTS, convert_llava_to_twist, freeze_all_but_twist, save_twist_delta

    plan = plan_json("--model-path", str(tiny_llava), "--twist_expert", "layer", "--twist_layers", "all")
    assert not plan["vision_tower"]["assumed_clip_vit_l_336"]
    model = convert_llava_to_twist(tiny_llava, torch_dtype=torch.bfloat16, twist_expert="layer", twist_layers="all")
    model.get_model().get_vision_tower().load_model()
    trainable, total = freeze_all_but_twist(model)
    assert (plan["parameters"]["trainable"], plan["parameters"]["total"]) == (trainable, total)
    delta = save_twist_delta(model, tmp_path / "delta", fingerprint="0" * 64) / DELTA_WEIGHTS
    assert plan["delta_bytes"] == delta.stat().st_size


def test_the_table_names_the_assumed_tower_and_its_estimates(tmp_path: Path) -> None:
    proc = run_module([PLAN, "--model-path", str(write_llava_config(tmp_path, "7b")), "--zero3-offload"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "CLIP ViT-L/14-336's shape assumed" in proc.stdout
    assert "zero3_offload.json" in proc.stdout and "estimates" in proc.stdout


@pytest.mark.parametrize(("argv", "pieces"), [
    (["--gpus", "0"], ["--gpus", "0"]),
    (["--nodes", "0"], ["--nodes"]),
    (["--twist_layers", "0,40"], ["twist_layers", "40", "[0, 31]"]),
    (["--twist_layers", "evens"], ["twist_layers"]),
    (["--zero3", "scripts/zero2.json"], ["zero2.json", "ZeRO-3"]),
    (["--batch-per-gpu", "0"], ["--batch-per-gpu"]),
    (["--zero3", "--zero3-offload"], ["--zero3-offload", "not allowed"]),
])
def test_bad_flags_are_one_line(tmp_path: Path, argv: list[str], pieces: list[str]) -> None:
    from cli_checks import REPO

    config = write_llava_config(tmp_path, "7b")
    assert_one_line(run_module([PLAN, "--model-path", str(config), *argv], cwd=REPO), *pieces)


def test_bad_model_paths_are_one_line(tmp_path: Path) -> None:
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "vocab_size": 32000}))
    assert_one_line(run_module([PLAN, "--model-path", str(mistral)]), "mistral", "not a LLaVA-1.5")
    language_only = write_llava_config(tmp_path / "vicuna", "7b", model_type="llama")
    assert_one_line(run_module([PLAN, "--model-path", str(language_only)]), "llama")
    wrong_tower = write_llava_config(tmp_path / "wide", "7b", mm_hidden_size=1280)
    assert_one_line(run_module([PLAN, "--model-path", str(wrong_tower)]), "mm_hidden_size 1280")
    assert_one_line(run_module([PLAN, "--model-path", str(tmp_path / "missing")]), "missing")
    assert_one_line(run_module([PLAN, "--model-path", "liuhaotian/llava-v1.5-7b"], env={"HF_HUB_OFFLINE": "1"}),
                    "liuhaotian/llava-v1.5-7b", "hub")


@pytest.mark.parametrize(("expert", "layers"), [("mlp", "every_other"), ("mlp", "all"), ("layer", "all")])
def test_layer_activations_are_what_autograd_keeps(expert: str, layers: str) -> None:
    """The per-layer estimate against the tensors autograd saves on a small bf16 TWIST model (SDPA attention with no
    mask, so the flash kernel, as the estimate assumes), input gradients on as training enables them."""
    import torch

    from llava_twist.model.builder import freeze_all_but_twist
    from llava_twist.model.config import TwistConfig
    from llava_twist.model.modeling import TwistLlavaLlamaForCausalLM
    from llava_twist.plan import activation_bytes

    vocab, hidden, batch, length = 256, 128, 2, 96
    config = TwistConfig(hidden_size=hidden, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=vocab, twist_expert=expert, twist_layers=layers, _attn_implementation="sdpa")
    torch.manual_seed(0)
    model = TwistLlavaLlamaForCausalLM(config).to(torch.bfloat16).train()
    freeze_all_but_twist(model)
    ids = torch.randint(0, vocab, (batch, length))
    embeds = model.get_model().embed_tokens(ids).detach().requires_grad_(True)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=embeds, labels=ids, twist_route=torch.ones(batch, dtype=torch.bool), use_cache=False)
    head = batch * length * (4 * vocab + 4 * hidden)  # what the head's autograd keeps: log-softmax, final norm
    estimate = activation_bytes(model.config, batch, length, checkpointing=False)["layers"]
    assert 0.95 <= (sum(kept.values()) - head) / estimate <= 1.08  # measured: 1.04 for each

"""TWIST model: exactness of the frozen route, conversion, training isolation, routing, round trips."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from PIL import Image

from llava_twist.model import TwistConfig, TwistLlavaLlamaForCausalLM, is_twist_param
from llava_twist.model.builder import (
    apply_twist_delta,
    convert_llava_to_twist,
    freeze_all_but_twist,
    load_pretrained_model,
    save_twist_checkpoint,
    save_twist_delta,
)
from llava_twist.model.routing import class_balanced_weights

KINDS = [
    {"twist_expert": "mlp", "twist_layers": "every_other"},
    {"twist_expert": "layer", "twist_layers": [1, 3]},
    {"twist_expert": "mlp", "twist_layers": "all", "twist_mix": "fixed", "twist_mix_init": 0.0},
    {"twist_expert": "layer", "twist_layers": "all", "twist_mix_init": 0.0, "twist_head": True},
]
KIND_IDS = ["mlp-every_other", "layer-1,3", "mlp-all-fixed0", "layer-all-head"]


def load_base(path: Path) -> LlavaLlamaForCausalLM:
    model = LlavaLlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    model.get_vision_tower().load_model()
    return model


def load_twist(path: Path, **twist_kwargs) -> TwistLlavaLlamaForCausalLM:
    model = convert_llava_to_twist(path, **twist_kwargs).eval()
    model.get_vision_tower().load_model()
    return model


def perturb_experts(model: TwistLlavaLlamaForCausalLM, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".twist_expert." in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def make_batch(path: Path, queries: list[str]) -> dict:
    from transformers import AutoTokenizer, CLIPImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=False)
    processor = CLIPImageProcessor.from_pretrained(str(path / "clip-vision-tower"))
    ids = []
    for q in queries:
        conv = conv_templates["v1"].copy()
        conv.append_message(conv.roles[0], "<image>\n" + q)
        conv.append_message(conv.roles[1], None)
        ids.append(tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt"))
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    attention = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = x
        attention[i, : len(x)] = 1
    images = [Image.new("RGB", (80 + 20 * i, 60), (200, 30 * i, 40)) for i in range(len(queries))]

    class Cfg:
        image_aspect_ratio = "pad"

    pixel = process_images(images, processor, Cfg())
    return {"input_ids": input_ids, "attention_mask": attention, "images": pixel}


QUERIES = ["What color is the circle?", "Where is the red square left of the star? Answer step by step."]


@pytest.mark.parametrize("kwargs", KINDS, ids=KIND_IDS)
def test_frozen_route_is_bit_identical_to_llava(tiny_llava: Path, kwargs: dict) -> None:
    base, twist = load_base(tiny_llava), load_twist(tiny_llava, **kwargs)
    perturb_experts(twist)  # the frozen route must not depend on the grounding experts
    batch = make_batch(tiny_llava, QUERIES)
    with torch.no_grad():
        expected = base(**batch).logits
        got = twist(**batch, twist_route="frozen").logits
    assert torch.equal(expected, got)
    gen = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    ids_base = base.generate(batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"], **gen)
    ids_twist = twist.generate(
        batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"], twist_route="frozen", **gen
    )
    assert torch.equal(ids_base, ids_twist)


@pytest.mark.parametrize("kwargs", KINDS, ids=KIND_IDS)
def test_fresh_grounding_route_equals_base(tiny_llava: Path, kwargs: dict) -> None:
    base, twist = load_base(tiny_llava), load_twist(tiny_llava, **kwargs)
    batch = make_batch(tiny_llava, QUERIES)
    with torch.no_grad():
        expected = base(**batch).logits
        got = twist(**batch, twist_route="grounding").logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    perturb_experts(twist)
    with torch.no_grad():
        moved = twist(**batch, twist_route="grounding").logits
    assert (moved - expected).abs().max() > 1e-3  # the grounding route really runs the experts


def test_stock_checkpoint_loads_with_only_new_weights_missing(tiny_llava: Path) -> None:
    twist = load_twist(tiny_llava)
    base = load_base(tiny_llava)
    base_names = {n for n, _ in base.named_parameters() if not n.startswith("model.vision_tower.")}
    twist_names = {n for n, _ in twist.named_parameters() if not n.startswith("model.vision_tower.")}
    assert base_names <= twist_names
    assert all(is_twist_param(n) for n in twist_names - base_names)
    assert twist_names - base_names  # the experts, mixes and router exist


@pytest.mark.parametrize("kwargs", [KINDS[0], KINDS[3]], ids=[KIND_IDS[0], KIND_IDS[3]])
def test_only_twist_params_train(tiny_llava: Path, kwargs: dict) -> None:
    twist = load_twist(tiny_llava, **kwargs)
    perturb_experts(twist)  # a fresh copy gives the mix a zero gradient (frozen(x) - grounding(x) = 0)
    twist.train()
    trainable, total = freeze_all_but_twist(twist)
    assert 0 < trainable < total
    assert all(p.requires_grad == is_twist_param(n) for n, p in twist.named_parameters())
    before = {n: p.detach().clone() for n, p in twist.named_parameters()}
    batch = make_batch(tiny_llava, QUERIES)
    labels = batch["input_ids"].clone()
    labels[:, :10] = -100
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == IMAGE_TOKEN_INDEX] = -100
    optim = torch.optim.AdamW([p for p in twist.parameters() if p.requires_grad], lr=1e-2)
    out = twist(**batch, labels=labels, twist_route=torch.tensor([True, True]),
                twist_router_labels=torch.tensor([0.0, 1.0]))
    assert out.router_loss is not None and out.lm_loss is not None
    out.loss.backward()
    optim.step()
    for name, p in twist.named_parameters():
        if is_twist_param(name):
            assert not torch.equal(p, before[name]), f"{name} did not move"
        else:
            assert torch.equal(p, before[name]), f"{name} changed"


def test_class_balanced_weights() -> None:
    weights = class_balanced_weights(torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(weights, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0]))
    assert torch.equal(class_balanced_weights(torch.ones(3)), torch.ones(3))


@pytest.mark.parametrize("balance", [False, True])
def test_router_loss_balances_the_tasks(tiny_llava: Path, balance: bool) -> None:
    twist = load_twist(tiny_llava, twist_router_balance=balance)
    with torch.no_grad():
        twist.model.twist_router.net[-1].weight.normal_(std=1.0)
    batch = make_batch(tiny_llava, [QUERIES[0], QUERIES[1], "Find the blue triangle. Answer step by step."])
    labels = torch.tensor([0.0, 1.0, 1.0])
    with torch.no_grad():
        out = twist(**batch, twist_route=labels.bool(), twist_router_labels=labels)
    per_sample = torch.nn.functional.binary_cross_entropy_with_logits(out.router_logits, labels, reduction="none")
    expected = (per_sample[0] + per_sample[1:].mean()) / 2 if balance else per_sample.mean()
    assert torch.allclose(out.router_loss, expected)
    assert not torch.allclose(per_sample[0], per_sample[1:].mean())  # the two weightings differ on this batch


def test_training_route_is_the_models_rule(tiny_llava: Path) -> None:
    """With router labels, the per-token gates route every token (the samples' routes are not forced on them), and
    a per-prompt router that the training pass does not reach is refused."""
    batch = make_batch(tiny_llava, QUERIES)
    labels = torch.tensor([0.0, 1.0])
    gated = load_twist(tiny_llava, twist_router="token")
    perturb_experts(gated)
    with torch.no_grad():
        taught = gated(**batch, twist_route=labels.bool(), twist_router_labels=labels)
        free = gated(**batch, twist_router_labels=labels)
        forced = gated(**batch, twist_route=labels.bool())
    assert taught.router_loss is not None  # the gates' BCE
    assert torch.equal(taught.logits, free.logits) and torch.equal(taught.router_loss, free.router_loss)
    assert not torch.equal(forced.logits, taught.logits)  # without labels, a given route is forced
    late = load_twist(tiny_llava, twist_router_layer=1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="twist_router_layer=1 must be a twin layer"):
        late(**batch, twist_route=labels.bool(), twist_router_labels=labels)


def test_frozen_samples_give_experts_no_gradient(tiny_llava: Path) -> None:
    twist = load_twist(tiny_llava, twist_head=True)
    twist.train()
    freeze_all_but_twist(twist)
    batch = make_batch(tiny_llava, QUERIES)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_INDEX, -100)
    twist(**batch, labels=labels, twist_route=torch.tensor([False, False])).loss.backward()
    expert_grads = [p.grad for n, p in twist.named_parameters() if ".twist_expert." in n]
    assert "lm_head.twist_expert.weight" in dict(twist.named_parameters())
    assert all(g is None or torch.count_nonzero(g) == 0 for g in expert_grads)


def expert_batch_sizes(model: TwistLlavaLlamaForCausalLM, layer: int) -> dict[str, list[int]]:
    """Samples per call of layer ``layer``'s frozen FFN and of its grounding copy, recorded by forward hooks."""
    kind = model.config.twist_expert
    copy = f"model.layers.{layer}." + ("mlp.twist_expert.gate_proj" if kind == "mlp" else "twist_expert.mlp.gate_proj")
    names = {"frozen": f"model.layers.{layer}.mlp.gate_proj", "grounding": copy}
    seen: dict[str, list[int]] = {role: [] for role in names}
    modules = dict(model.named_modules())
    for role, name in names.items():
        modules[name].register_forward_hook(lambda _m, args, _out, role=role: seen[role].append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("kwargs", KINDS, ids=KIND_IDS)
def test_training_runs_each_expert_on_its_own_samples(tiny_llava: Path, kwargs: dict) -> None:
    twist = load_twist(tiny_llava, **kwargs)
    perturb_experts(twist)
    freeze_all_but_twist(twist)  # and no KV cache, as in training (a cache keeps the whole-batch path)
    batch = make_batch(tiny_llava, [*QUERIES, "Find the blue triangle. Answer step by step."])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_INDEX, -100)
    route = torch.tensor([False, True, True])

    def loss_and_grads(train: bool, route: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        twist.train(train)
        twist.zero_grad(set_to_none=True)
        out = twist(**batch, labels=labels, twist_route=route, twist_router_labels=route.float(), use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in twist.named_parameters() if p.requires_grad}

    layer = twist.config.twin_layer_indices()[-1]
    seen = expert_batch_sizes(twist, layer)
    split_logits, split_grads = loss_and_grads(True, route)
    reads_frozen = twist.model.layers[layer].mixes()[0].uses_frozen()
    assert seen == {"frozen": [3 if reads_frozen else 1], "grounding": [2]}
    whole_logits, whole_grads = loss_and_grads(False, route)  # inference's path: both experts on every sample
    assert seen == {"frozen": [3 if reads_frozen else 1, 3], "grounding": [2, 3]}
    torch.testing.assert_close(split_logits, whole_logits, rtol=1e-5, atol=1e-5)
    assert all(g is not None for g in split_grads.values())
    assert any(g.abs().sum() > 0 for n, g in split_grads.items() if ".twist_expert." in n)
    zeros = {n: torch.zeros_like(p) for n, p in twist.named_parameters() if p.requires_grad}
    torch.testing.assert_close({n: g if g is not None else zeros[n] for n, g in whole_grads.items()}, split_grads,
                               rtol=1e-4, atol=1e-6)

    # ZeRO-3: every rank runs both experts and reduces every gradient, also when its batch has no sample of
    # one route; that expert then runs on one stand-in sample (FlashAttention refuses a batch of 0) for nothing.
    for route, frozen_calls, grounding_calls in ((torch.ones(3, dtype=torch.bool), 3 if reads_frozen else 1, 3),
                                                 (torch.zeros(3, dtype=torch.bool), 3, 1)):
        seen["frozen"].clear(), seen["grounding"].clear()
        _, grads = loss_and_grads(True, route)
        assert seen == {"frozen": [frozen_calls], "grounding": [grounding_calls]}
        assert all(g is not None for g in grads.values())
        if not route.any():
            assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if ".twist_expert." in n)


def set_router_bias(model: TwistLlavaLlamaForCausalLM, bias: float) -> None:
    with torch.no_grad():
        model.get_model().twist_router.net[-1].bias.fill_(bias)


def test_auto_route_follows_the_router(tiny_llava: Path) -> None:
    twist = load_twist(tiny_llava)
    perturb_experts(twist)
    batch = make_batch(tiny_llava, QUERIES)
    with torch.no_grad():
        frozen = twist(**batch, twist_route="frozen").logits
        grounding = twist(**batch, twist_route="grounding").logits
        set_router_bias(twist, -6.0)
        out = twist(**batch, twist_route="auto")
        assert torch.equal(out.logits, frozen)
        assert out.twist_decision.routes() == ["frozen", "frozen"]
        assert not out.twist_decision.forced.any()
        set_router_bias(twist, 6.0)
        out = twist(**batch)
        assert torch.equal(out.logits, grounding)
        assert out.twist_decision.routes() == ["grounding", "grounding"]
        assert float(out.twist_decision.prob.min()) > 0.99
        mixed = twist(**batch, twist_route=torch.tensor([False, True])).logits
    assert torch.equal(mixed[0], frozen[0])
    torch.testing.assert_close(mixed[1], grounding[1], rtol=1e-5, atol=1e-5)


def test_router_reads_only_the_prompt_after_the_image(tiny_llava: Path) -> None:
    """The router decision must not depend on the answer tokens (absent at inference)."""
    twist = load_twist(tiny_llava)
    with torch.no_grad():
        twist.get_model().twist_router.net[-1].weight.normal_()
    batch = make_batch(tiny_llava, QUERIES[:1])
    with torch.no_grad():
        p_prompt = twist(**batch).twist_decision.prob
        answer = torch.tensor([[34, 56, 78, 2]])
        ids = torch.cat([batch["input_ids"], answer], dim=1)
        labels = torch.cat([torch.full_like(batch["input_ids"], -100), answer], dim=1)
        p_with_answer = twist(input_ids=ids, images=batch["images"], labels=labels).twist_decision.prob
    torch.testing.assert_close(p_prompt, p_with_answer)


@pytest.mark.parametrize("kwargs", [KINDS[0], KINDS[1], KINDS[3]], ids=[KIND_IDS[0], KIND_IDS[1], KIND_IDS[3]])
def test_generate_with_kv_cache_matches_recompute(tiny_llava: Path, kwargs: dict) -> None:
    twist = load_twist(tiny_llava, **kwargs)
    perturb_experts(twist, 0.2)
    batch = make_batch(tiny_llava, QUERIES)
    common = {"images": batch["images"], "attention_mask": batch["attention_mask"], "max_new_tokens": 10,
              "do_sample": False, "pad_token_id": 0}
    for route in ("grounding", "frozen"):
        cached = twist.generate(batch["input_ids"], twist_route=route, use_cache=True, **common)
        recomputed = twist.generate(batch["input_ids"], twist_route=route, use_cache=False, **common)
        assert torch.equal(cached, recomputed), route
    grounding = twist.generate(batch["input_ids"], twist_route="grounding", **common)
    frozen = twist.generate(batch["input_ids"], twist_route="frozen", **common)
    assert not torch.equal(grounding, frozen)  # the forced route changes what is generated
    set_router_bias(twist, 6.0)
    out = twist.generate(batch["input_ids"], return_dict_in_generate=True, **common)
    assert torch.equal(out.sequences, grounding)
    assert out.twist_decision.routes() == ["grounding", "grounding"]


def test_beam_search_runs_on_the_twist_cache(tiny_llava: Path) -> None:
    twist = load_twist(tiny_llava, twist_expert="layer", twist_layers="all")
    perturb_experts(twist, 0.2)
    batch = make_batch(tiny_llava, QUERIES)
    common = dict(images=batch["images"], attention_mask=batch["attention_mask"], twist_route="grounding",
                  num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = twist.generate(batch["input_ids"], **common)
    recomputed = twist.generate(batch["input_ids"], use_cache=False, **common)
    assert cached.shape == (2, 7)  # a BOS column, then the new tokens
    assert torch.equal(cached, recomputed)  # beams reorder the twins' KV entries (layer_idx + layers) as the rest


def test_full_checkpoint_round_trip_and_plain_llava_reads_it(tiny_llava: Path, tmp_path: Path) -> None:
    twist = load_twist(tiny_llava, twist_expert="layer", twist_layers=[0, 2])
    perturb_experts(twist)
    out = save_twist_checkpoint(twist, tmp_path / "llava-twist-ckpt")
    shutil.copy(tiny_llava / "tokenizer.model", out)
    shutil.copy(tiny_llava / "tokenizer_config.json", out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava_twist"
    _, loaded, processor, context_len = load_pretrained_model(str(out), None, "llava-twist-ckpt", device="cpu")
    assert processor is not None and context_len == 2048
    batch = make_batch(tiny_llava, QUERIES)
    with torch.no_grad():
        for route in ("frozen", "grounding"):
            assert torch.equal(twist(**batch, twist_route=route).logits, loaded(**batch, twist_route=route).logits)
        plain = LlavaLlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
        plain.get_vision_tower().load_model()
        assert torch.equal(plain(**batch).logits, load_base(tiny_llava)(**batch).logits)


def test_delta_round_trip_and_wrong_base_refused(tiny_llava: Path, other_tiny_llava: Path, tmp_path: Path) -> None:
    twist = load_twist(tiny_llava, twist_expert="mlp", twist_layers="all", twist_head=True)
    perturb_experts(twist)
    delta = save_twist_delta(twist, tmp_path / "twist-delta")
    size = (delta / "twist_delta.safetensors").stat().st_size
    full = sum(p.numel() * 4 for p in twist.parameters())
    assert size < full
    _, loaded, _, _ = load_pretrained_model(str(delta), str(tiny_llava), "twist-delta", device="cpu")
    batch = make_batch(tiny_llava, QUERIES)
    with torch.no_grad():
        assert torch.equal(twist(**batch, twist_route="grounding").logits,
                           loaded(**batch, twist_route="grounding").logits)
    with pytest.raises(ValueError, match="another base"):
        load_pretrained_model(str(delta), str(other_tiny_llava), "twist-delta", device="cpu")
    with pytest.raises(ValueError, match="model_base"):
        load_pretrained_model(str(delta), None, "twist-delta", device="cpu")
    wrong_shape = load_twist(tiny_llava, twist_expert="mlp", twist_layers=[0])
    with pytest.raises(ValueError, match="does not fit"):
        apply_twist_delta(wrong_shape, delta)


def test_plain_llava_checkpoint_loads_converted(tiny_llava: Path) -> None:
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_llava), None, "llava-v1.5-tiny", device="cpu")
    assert isinstance(model, TwistLlavaLlamaForCausalLM)
    batch = make_batch(tiny_llava, QUERIES)
    with torch.no_grad():
        out = model(**batch)
        assert torch.equal(out.logits, load_base(tiny_llava)(**batch).logits)
    assert out.twist_decision.routes() == ["frozen", "frozen"]  # an untrained router keeps the original


def test_llavas_own_loader_reads_the_tiny_checkpoint(tiny_llava: Path) -> None:
    from llava.model.builder import load_pretrained_model as llava_load

    tokenizer, model, processor, context_len = llava_load(str(tiny_llava), None, "llava-v1.5-tiny", device="cpu")
    assert isinstance(model, LlavaLlamaForCausalLM) and processor.crop_size["height"] == 56
    batch = make_batch(tiny_llava, QUERIES[:1])
    out = model.generate(batch["input_ids"], images=batch["images"].half(), max_new_tokens=4, do_sample=False)
    ours = load_pretrained_model(str(tiny_llava), None, device="cpu", torch_dtype=torch.float16)[1]
    frozen = ours.generate(batch["input_ids"], images=batch["images"].half(), max_new_tokens=4, do_sample=False,
                           twist_route="frozen")
    assert out.shape == (1, 5) and torch.equal(out, frozen)  # our loader in LLaVA's dtypes: its very tokens


def test_tiny_tokenizer_fits_llavas_v1_preprocessing(tiny_llava: Path) -> None:
    from llava.train.train import preprocess_v1
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llava), use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    source = [[
        {"from": "human", "value": "<image>\nWhere is the red circle? Answer step by step."},
        {"from": "gpt", "value": "Step 1: The red circle is at [0.10, 0.15, 0.30, 0.35].\n"
                                 "Answer: [0.10, 0.15, 0.30, 0.35]"},
        {"from": "human", "value": "How many squares are there?"},
        {"from": "gpt", "value": "There are 2 squares."},
    ]]
    out = preprocess_v1(source, tokenizer, has_image=True)
    supervised = (out["labels"][0] != -100).sum().item()
    assert supervised > 10  # a tokenizer/template mismatch masks the whole sample


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"twist_layers": [0, 7]}, "out of range"),
        ({"twist_layers": "some"}, "twist_layers"),
        ({"twist_expert": "attention"}, "twist_expert"),
        ({"twist_mix_init": 1.5}, "twist_mix_init"),
        ({"twist_router_layer": 9}, "twist_router_layer"),
        ({"twist_head": True, "twist_router": "token"}, "twist_head"),
    ],
)
def test_bad_twist_settings_are_named(tiny_llava: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_llava_to_twist(tiny_llava, **kwargs)


def test_non_llama_base_is_refused(tiny_llava: Path, tmp_path: Path) -> None:
    fake = tmp_path / "llava-mpt"
    fake.mkdir()
    config = json.loads((tiny_llava / "config.json").read_text())
    config["model_type"] = "llava_mpt"
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a LLaVA-1.5 Llama checkpoint"):
        convert_llava_to_twist(fake)
    (fake / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON"):
        convert_llava_to_twist(fake)


def test_missing_llava_is_explained() -> None:
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'llava' or name.startswith('llava.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import llava_twist\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pip install --no-deps llava-torch==1.2.2.post1" in proc.stderr


def test_config_round_trips_through_json(tmp_path: Path) -> None:
    config = TwistConfig(twist_layers=[1, 2], twist_expert="layer", num_hidden_layers=4)
    config.save_pretrained(str(tmp_path))
    again = TwistConfig.from_pretrained(str(tmp_path))
    assert again.twist_layers == [1, 2] and again.twist_expert == "layer"
    from transformers import AutoConfig

    assert type(AutoConfig.from_pretrained(str(tmp_path))) is TwistConfig


def test_route_decision_survives_decode_steps(tiny_llava: Path) -> None:
    twist = load_twist(tiny_llava)
    with torch.no_grad():
        twist.get_model().twist_router.net[-1].weight.normal_(std=0.5)
    batch = make_batch(tiny_llava, QUERIES)
    common = {"images": batch["images"], "attention_mask": batch["attention_mask"], "do_sample": False,
              "pad_token_id": 0}
    with torch.no_grad():
        after_prefill = twist(**batch).twist_decision.prob
    out = twist.generate(batch["input_ids"], max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True,
                         **common)
    assert torch.equal(out.twist_decision.prob, after_prefill)
    assert not hasattr(twist, "twist_last_route") and not hasattr(twist.get_model(), "twist_last_decision")

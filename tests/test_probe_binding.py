"""The binding probe (scripts/probe_binding.py) asks what it says and can be learnt when the task is one hop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def probe(load_script):
    return load_script("probe_binding")


@pytest.mark.parametrize("answer", ["word", "echo"])
def test_each_question_asks_the_colour_of_the_object_with_the_named_shape(probe, answer: str) -> None:
    b = probe.sample_batch(random.Random(3), 64, answer)
    words = probe.WORDS
    for i in range(64):
        text = [words[t] for t in b.text[i]]
        shape = next(w for w in text if w.startswith("shape"))
        cells = (b.shapes[i] == int(shape[5:]) + 1).nonzero().flatten().tolist()
        assert len(cells) == 1, "the named shape must be unique in the scene"
        colour = words[int(b.labels[i, b.answer_at[i]])]
        assert colour == f"colour{int(b.colours[i, cells[0]]) - 1}"
        answered = (b.labels[i] != -100).nonzero().flatten().tolist()
        assert answered[-1] == b.answer_at[i] and len(answered) == (2 if answer == "echo" else 1)
        assert 2 <= int((b.shapes[i] > 0).sum()) <= 4


def test_a_one_hop_answer_is_learnt(probe) -> None:
    """A fitted toy: every held-out question right (measured: all 128 right by step 150 of 300, seeds 0-2, 1 and 2
    threads)."""
    history = probe.run(heads=4, layers=2, hidden=64, steps=300, answer="echo", eval_every=150, held_out=128,
                        log=False)
    assert history[-1][2] == 1.0, history


def test_tower_scenes_ask_about_rendered_objects_in_their_own_patches(probe, tmp_path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from llava_twist.tiny import TinyLlavaSpec, build_vision_tower
    from playground.miniature.vision_pretrain import patch_features, preprocess

    tower = build_vision_tower(tmp_path, TinyLlavaSpec(vision_hidden_size=16, vision_layers=2, image_size=64,
                                                       patch_size=16))
    world = probe.WorldScenes(tower, 12, 6, seed=0)
    assert len(world.held_out) == 6 and world.features.shape == (18, probe.PATCHES, 16)
    cfg = probe.world_config()
    model = CLIPVisionModel.from_pretrained(str(tower)).eval()
    processor = CLIPImageProcessor.from_pretrained(str(tower))
    rendered = [probe.render(cfg, "train:0", i, i) for i in range(12)]
    i, row = 0, 12  # held-out scenes without a uniquely shaped object are skipped, and take no row
    while row < 18:
        scene, image = probe.render(cfg, "held-out:0", i, row)
        i += 1
        if probe.unique_shaped(scene[0]):
            rendered.append((scene, image))
            row += 1
    assert [scene for scene, _ in rendered] == world.train + world.held_out
    with torch.no_grad():
        features = patch_features(model, preprocess(processor, [image for _, image in rendered]), -2)
    assert torch.allclose(world.features, features, atol=1e-5)
    for (objs, cells, _), image in rendered:
        assert 2 <= len(objs) <= 4 and len(set(cells)) == len(cells)
        pixels = np.asarray(image.convert("RGB")).reshape(4, 16, 4, 16, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1, 3)
        background = pixels[0, 0]  # objects sit centred in their cells, off the cells' corners
        for cell in range(probe.PATCHES):
            assert (pixels[cell] != background).any() == (cell in cells)
    held = probe.sample_batch(random.Random(0), 6, "word", world.held_out_in_order())
    assert held.scene.tolist() == [row for _, _, row in world.held_out]
    for i in range(6):
        objs, cells, _ = world.held_out[i]
        shape = int(next(w for w in (probe.WORDS[t] for t in held.text[i]) if w.startswith("shape"))[5:])
        assert [s for s, _ in objs].count(shape) == 1
        for (s, c), cell in zip(objs, cells, strict=True):
            assert (int(held.shapes[i, cell]), int(held.colours[i, cell])) == (s + 1, c + 1)


@pytest.mark.parametrize("tokens", ["tower", "ideal"])
def test_a_probe_on_the_world_trains(probe, tmp_path, tokens: str) -> None:
    from llava_twist.tiny import TinyLlavaSpec, build_vision_tower

    tower = build_vision_tower(tmp_path, TinyLlavaSpec(vision_hidden_size=16, vision_layers=1, image_size=64,
                                                       patch_size=16)) if tokens == "tower" else None
    history = probe.run(heads=2, layers=1, hidden=16, steps=12, batch=4, eval_every=1, held_out=4, log=False,
                        tower=tower, world=True, scenes=8)
    assert [step for step, _, _ in history] == list(range(1, 13))
    losses = [loss for _, loss, _ in history]
    # on this fixed seed the loss falls from 3.15 to 2.67 (tower) and 3.15 to 2.65 (ideal), the same at 1 and 2 threads
    assert losses[-1] < 0.95 * losses[0], losses

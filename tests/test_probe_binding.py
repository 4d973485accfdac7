"""The binding probe (scripts/probe_binding.py) asks what it says and can be learnt when the task is one hop."""

from __future__ import annotations

import random

import numpy as np
import pytest


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
    history = probe.run(heads=4, layers=2, hidden=64, steps=300, answer="echo", eval_every=150, held_out=128,
                        log=False)
    assert history[-1][2] >= 0.9, history


def test_tower_scenes_ask_about_rendered_objects_in_their_own_patches(probe, tmp_path) -> None:
    from llava_twist.tiny import TinyLlavaSpec, build_vision_tower

    tower = build_vision_tower(tmp_path, TinyLlavaSpec(vision_hidden_size=16, vision_layers=1, image_size=64,
                                                       patch_size=16))
    scenes = probe.TowerScenes(tower, 12, "test")
    assert scenes.features.shape == (12, probe.PATCHES, 16)
    cfg = probe.world_config()
    for objs, cells, index in scenes.scenes:
        assert 2 <= len(objs) <= 4 and len(set(cells)) == len(cells)
        scene, image = probe.render(cfg, "test", index)
        assert scene == (objs, cells, index)
        pixels = np.asarray(image.convert("RGB")).reshape(4, 16, 4, 16, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1, 3)
        background = pixels[0, 0]  # objects sit centred in their cells, off the cells' corners
        for cell in range(probe.PATCHES):
            drawn = (pixels[cell] != background).any(-1)
            assert drawn.any() == (cell in cells), (index, cell)
    b = probe.sample_batch(random.Random(0), 16, "word", scenes.draw)
    for i in range(16):
        objs, cells, index = scenes.scenes[int(b.scene[i])]
        assert index == int(b.scene[i])
        for (shape, colour), cell in zip(objs, cells, strict=True):
            assert (int(b.shapes[i, cell]), int(b.colours[i, cell])) == (shape + 1, colour + 1)
    model = probe.Probe(hidden=32, layers=1, heads=4, seed=0, features=scenes.features)
    assert 0.0 <= probe.accuracy(model, b) <= 1.0

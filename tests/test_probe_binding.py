"""The binding probe (scripts/probe_binding.py) asks what it says and can be learnt when the task is one hop."""

from __future__ import annotations

import random

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

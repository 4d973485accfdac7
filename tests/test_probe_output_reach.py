"""The output-layer probe (scripts/probe_output_reach.py) finds which words a frozen lm_head can make likely."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def probe(load_script):
    return load_script("probe_output_reach")


def test_a_row_inside_the_others_is_capped_and_an_outer_row_is_not(probe) -> None:
    outer = 3.0 * torch.cat([torch.eye(4), -torch.eye(4)])
    head = torch.cat([outer, torch.zeros(1, 4), 0.5 * outer[:1]])  # row 8: the centre; row 9: half of row 0
    best = probe.ceilings(head, torch.ones(4), [0, 8, 9])
    assert best[0] > math.log(0.9)
    assert best[1] < math.log(0.2)  # no direction lifts the centre row above its neighbours
    assert best[2] < math.log(0.5)  # row 0 always outscores its own half
    assert probe.ceilings(head, 4 * torch.ones(4), [0])[0] > best[0]  # a longer hidden state sharpens it


def test_cli_probes_a_checkpoints_answer_words_and_names_a_bad_folder(probe, tiny_llava: Path, tmp_path: Path,
                                                                      capsys) -> None:
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": "0", "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                                                              {"from": "gpt", "value": "Step 1: the red circle."}]}]))
    assert probe.main([str(tiny_llava), "--data", str(data), "--words", "Answer"]) == 0
    out = capsys.readouterr().out
    assert "tokens probed" in out and "ceiling" in out
    assert probe.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probe_output_reach:") and "nowhere" in err and "\n" not in err

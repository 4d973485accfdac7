"""The tiny checkpoint's tokenizer: Llama-like digit splitting by default, one token per box coordinate on request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llava_twist.tiny import default_corpus, main, train_tokenizer

ANSWER = "Step 3: The leftmost of them is [0.05, 0.40, 0.31, 1.00].\nAnswer: [0.05, 0.40, 0.31, 1.00]"


@pytest.mark.parametrize("coordinate_tokens", [False, True])
def test_box_tokens_and_round_trip(tmp_path: Path, coordinate_tokens: bool) -> None:
    train_tokenizer(tmp_path, default_corpus(), 640, coordinate_tokens)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), use_fast=False)
    ids = tok(ANSWER, add_special_tokens=False).input_ids
    assert tok.decode(ids) == ANSWER
    box = tok.tokenize("[0.05, 0.40, 0.31, 1.00]")
    coordinates = [piece for piece in box if piece.strip("▁") in ("0.05", "0.40", "0.31", "1.00")]
    if coordinate_tokens:
        assert coordinates == ["0.05", "0.40", "0.31", "1.00"]
        assert len(box) == 12
    else:
        assert coordinates == []
        assert "5" in box and len(box) == 24
    assert len(tok) == 640


def test_cli_builds_with_coordinate_tokens(tmp_path: Path) -> None:
    main(["--out", str(tmp_path / "m"), "--hidden-size", "16", "--intermediate-size", "32",
          "--coordinate-tokens", "True"])
    assert json.loads((tmp_path / "m" / "tiny_llava_spec.json").read_text())["coordinate_tokens"] is True
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"), use_fast=False)
    assert "0.42" in tok.tokenize("[0.42, 0.10, 0.50, 0.99]")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "n"), "--coordinate-tokens", "yes"])
    assert not (tmp_path / "n").exists()


def test_demo_vocabulary_gives_each_word_of_the_world_one_token(tmp_path: Path) -> None:
    """The full demo's vocabulary size is what keeps its records short: every word of its world is one piece."""
    from llava.conversation import conv_templates

    from llava_twist.demo.recipe import WORLD, full_recipe

    spec = full_recipe().model
    train_tokenizer(tmp_path, default_corpus(), spec.vocab_size, spec.coordinate_tokens)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), use_fast=False)
    words = [w for key in ("shapes", "colours", "sizes") for w in WORLD[key].split(",")]
    words += "Step Answer step leftmost rightmost largest smallest candidates image object".split()
    split = {w: tok.tokenize(f"the {w}")[1:] for w in words}
    assert {w: p for w, p in split.items() if len(p) != 1} == {}
    assert len(tok(conv_templates["v1"].system, add_special_tokens=False).input_ids) <= 40
    assert len(tok) == spec.vocab_size

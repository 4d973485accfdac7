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


def test_overwrite_replaces_the_folder_never_merges_into_it(tmp_path: Path) -> None:
    """``--overwrite`` over a TWIST delta folder once left its ``twist_delta.safetensors`` beside the new weights,
    and the new checkpoint loaded as a delta."""
    out = tmp_path / "m"
    out.mkdir()
    (out / "twist_delta.safetensors").write_bytes(b"an old delta")
    (out / "notes.txt").write_text("kept nowhere")
    main(["--out", str(out), "--hidden-size", "16", "--intermediate-size", "32", "--overwrite"])
    assert not (out / "twist_delta.safetensors").exists() and not (out / "notes.txt").exists()
    config = json.loads((out / "config.json").read_text())
    assert Path(config["mm_vision_tower"]) == (out / "clip-vision-tower").resolve()
    assert (out / "clip-vision-tower" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left beside it


def test_demo_vocabulary_gives_each_word_of_the_world_one_token(tmp_path: Path) -> None:
    """The full demo's vocabulary size is what keeps its records short: every word of its world is one piece."""
    from llava.conversation import conv_templates

    from playground.miniature.recipe import WORLD, full_recipe

    spec = full_recipe().model
    train_tokenizer(tmp_path, default_corpus(), spec.vocab_size, spec.coordinate_tokens)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), use_fast=False)
    words = [w for key in ("shapes", "colours", "sizes") for w in WORLD[key].split(",")]
    words += "Step Answer step leftmost rightmost largest smallest candidates image object".split()
    split = {w: tok.tokenize(f"the {w}")[1:] for w in words}
    assert {w: p for w, p in split.items() if len(p) != 1} == {}
    assert len(tok(conv_templates["v1"].system, add_special_tokens=False).input_ids) <= 40
    assert len(tok) == spec.vocab_size


def _answer_spans(tok, conversations: list[dict[str, str]]) -> list[str]:
    """The label spans LLaVA's own preprocessing keeps for training, decoded."""
    import copy

    from llava import conversation as conversation_lib
    from llava.constants import IGNORE_INDEX
    from llava.train.train import preprocess

    saved = conversation_lib.default_conversation
    conversation_lib.default_conversation = conversation_lib.conv_templates["v1"]
    try:
        out = preprocess([copy.deepcopy(conversations)], tok, has_image=True)
    finally:
        conversation_lib.default_conversation = saved
    labels = out["labels"][0].tolist()
    spans, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans.append(tok.decode(current).strip())
            current = []
    return spans


@pytest.mark.parametrize("source", ["trained", "release"])
def test_llava_trains_on_every_round_of_a_multi_turn_conversation(tmp_path: Path, source: str) -> None:
    """LLaVA-1.5's data is multi-turn (several questions about one image); with a tokenizer whose rounds LLaVA
    miscounts, it masks the whole record and trains on nothing, warning once per record."""
    from playground.miniature.recipe import full_recipe
    from playground.miniature.release import RELEASE_DIR

    if source == "trained":
        spec = full_recipe().model
        train_tokenizer(tmp_path, default_corpus(), spec.vocab_size, spec.coordinate_tokens)
        folder = tmp_path
    else:
        folder = Path(__file__).resolve().parents[1] / RELEASE_DIR
    tok = AutoTokenizer.from_pretrained(str(folder), use_fast=False)
    tok.pad_token = tok.unk_token
    turns = [("<image>\nWhat colour is the circle? Answer the question using a single word or phrase.", "red"),
             ("Is there a blue square in the image? Answer the question using a single word or phrase.", "No"),
             ("Please provide the bounding box coordinate of the region this sentence describes: the red circle.",
              "[0.28, 0.03, 0.45, 0.20]")]
    conversations = [{"from": who, "value": text} for q, a in turns for who, text in (("human", q), ("gpt", a))]
    assert _answer_spans(tok, conversations) == [f"{a}</s>" for _, a in turns]
    assert _answer_spans(tok, conversations[:2]) == ["red</s>"]

"""The writer: LLaVA records that LLaVA's own reader accepts, and text the parser reads back."""

from __future__ import annotations

import io
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from scout_data.boxes import box_xyxy_px_to_norm
from scout_data.parse import parse_chain
from scout_data.schema import Sample, Step
from scout_data.validate import record_problems
from scout_data.writer import (
    PHRASES,
    fill_slots,
    item_list,
    phrase,
    render_gpt,
    render_prompt,
    render_record,
)


def chain_sample(**kw) -> Sample:
    base = dict(
        id="s1",
        image="img.png",
        width=200,
        height=100,
        query="Where is the red circle left of the blue square?",
        kind="refexp",
        steps=[
            Step("The question asks for the red circle left of the blue square."),
            Step(
                "I see these candidates: red circle <box> and red circle <box>.",
                [(20, 10, 60, 50), (140, 10, 180, 50)],
            ),
            Step("The blue square is at <box>", [(100, 40, 130, 70)]),
        ],
        answer_boxes_xyxy_px=[(20, 10, 60, 50)],
        difficulty="hard",
    )
    base.update(kw)
    return Sample(**base)


def test_chain_record_layout_and_exact_text():
    rec = render_record(chain_sample())
    human, gpt = rec["conversations"]
    assert human == {
        "from": "human",
        "value": "<image>\nWhere is the red circle left of the blue square? Answer step by step.",
    }
    # padded frame: 200x100 sits at y offset 50 in a 200x200 square
    assert gpt["value"] == (
        "Step 1: The question asks for the red circle left of the blue square.\n"
        "Step 2: I see these candidates: red circle [0.10, 0.30, 0.30, 0.50] and red circle "
        "[0.70, 0.30, 0.90, 0.50].\n"
        "Step 3: The blue square is at [0.50, 0.45, 0.65, 0.60].\n"
        "Answer: [0.10, 0.30, 0.30, 0.50]"
    )
    assert rec["task"] == "grounding" and rec["box_frame"] == "padded" and rec["image_size"] == [200, 100]
    assert rec["answer_boxes_xyxy_norm"] == [[0.1, 0.3, 0.3, 0.5]]
    assert rec["steps"][1]["boxes_xyxy_norm"] == [[0.1, 0.3, 0.3, 0.5], [0.7, 0.3, 0.9, 0.5]]
    assert record_problems(rec) == []


def test_original_frame_and_answer_forms():
    rec = render_record(chain_sample(), frame="original")
    assert rec["conversations"][1]["value"].endswith("Answer: [0.10, 0.10, 0.30, 0.50]")
    count = chain_sample(
        kind="count", answer_text="2", answer_boxes_xyxy_px=[(20, 10, 60, 50), (140, 10, 180, 50)]
    )
    assert render_gpt(count).endswith("Answer: 2 [0.10, 0.30, 0.30, 0.50], [0.70, 0.30, 0.90, 0.50]")
    cap = chain_sample(
        kind="grounded_caption",
        answer_text="A red circle <box> near a square <box>.",
        answer_boxes_xyxy_px=[(20, 10, 60, 50), (100, 40, 130, 70)],
    )
    assert render_gpt(cap).endswith(
        "Answer: A red circle [0.10, 0.30, 0.30, 0.50] near a square [0.50, 0.45, 0.65, 0.60]."
    )
    region = render_record(chain_sample(kind="region", query="the red circle", steps=[]))
    assert region["conversations"][0]["value"] == (
        "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: "
        "the red circle."
    )
    assert region["conversations"][1]["value"] == "[0.10, 0.30, 0.30, 0.50]"
    qa = render_record(
        chain_sample(
            kind="qa",
            query="What colour is it?",
            steps=[],
            answer_text="red",
            answer_boxes_xyxy_px=[],
            task="understanding",
        )
    )
    assert qa["task"] == "understanding" and qa["conversations"][1]["value"] == "red"
    assert qa["conversations"][0]["value"] == "<image>\nWhat colour is it?"
    no_image = render_record(chain_sample(image=""))
    assert "image" not in no_image and "<image>" not in no_image["conversations"][0]["value"]


def test_region_caption_shows_the_region_in_the_prompt_and_answers_in_words():
    sample = chain_sample(kind="region_caption", query="<box>", steps=[], answer_boxes_xyxy_px=[],
                          query_boxes_xyxy_px=[(20, 10, 60, 50)], answer_text="the red circle", task="understanding")
    padded, original = render_record(sample), render_record(sample, frame="original")
    assert padded["conversations"][0]["value"] == (
        "<image>\nPlease provide a short description for this region: [0.10, 0.30, 0.30, 0.50]."
    )
    assert original["conversations"][0]["value"].endswith("region: [0.10, 0.10, 0.30, 0.50].")
    assert padded["conversations"][1]["value"] == "the red circle"
    assert padded["task"] == "understanding" and padded["query"] == "[0.10, 0.30, 0.30, 0.50]"
    assert record_problems(padded) == []
    with pytest.raises(ValueError, match="1 box slots but 0 boxes"):
        render_record(chain_sample(kind="region_caption", query="<box>", steps=[], answer_text="the red circle"))


def test_render_prompt_matches_training_prompt():
    for kind in ("refexp", "find_all", "count", "grounded_caption", "region", "qa"):
        s = chain_sample(kind=kind, steps=[] if kind in ("region", "qa") else chain_sample().steps)
        assert render_record(s)["conversations"][0]["value"] == "<image>\n" + render_prompt(s.query, kind)


def test_slots_must_match_boxes_and_phrasings_vary_by_seed():
    with pytest.raises(ValueError):
        fill_slots("a <box> b <box>", [(0.1, 0.1, 0.2, 0.2)])
    assert item_list(["a", "b", "c"]) == "a <box>, b <box> and c <box>"
    assert all(len(v) >= 2 for v in PHRASES.values())
    seen = {phrase(random.Random(s), "candidates", items="x") for s in range(30)}
    assert len(seen) == len(PHRASES["candidates"])
    assert phrase(random.Random(5), "asks", target="t") == phrase(random.Random(5), "asks", target="t")


@st.composite
def random_sample(draw: st.DrawFn) -> Sample:
    w, h = draw(st.integers(8, 3000)), draw(st.integers(8, 3000))

    def box():
        x1, y1 = draw(st.integers(0, w - 2)), draw(st.integers(0, h - 2))
        return (x1, y1, draw(st.integers(x1 + 1, w)), draw(st.integers(y1 + 1, h)))

    steps = [
        Step("Look " + " ".join(["<box>"] * k), [box() for _ in range(k)])
        for k in draw(st.lists(st.integers(0, 3), max_size=4))
    ]
    answers = [box() for _ in range(draw(st.integers(1, 4)))]
    kind = draw(st.sampled_from(["refexp", "find_all", "count", "region"]))
    return chain_sample(
        width=w,
        height=h,
        steps=[] if kind == "region" else steps,
        kind=kind,
        answer_boxes_xyxy_px=answers,
        answer_text="3" if kind == "count" else "",
    )


@settings(max_examples=150, deadline=None)
@given(random_sample(), st.sampled_from(["padded", "original"]))
def test_parse_of_writer_output_recovers_every_box(sample, frame):
    chain = parse_chain(render_gpt(sample, frame))
    assert len(chain.steps) == len(sample.steps)
    for got, step in zip(chain.steps, sample.steps, strict=True):
        want = [box_xyxy_px_to_norm(b, sample.width, sample.height, frame) for b in step.boxes_xyxy_px]
        assert len(got.boxes_xyxy_norm) == len(want)
        for a, b in zip(got.boxes_xyxy_norm, want, strict=True):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 0.005 + 1e-9
    want = [box_xyxy_px_to_norm(b, sample.width, sample.height, frame) for b in sample.answer_boxes_xyxy_px]
    assert len(chain.answer_boxes_xyxy_norm) == len(want)
    for a, b in zip(chain.answer_boxes_xyxy_norm, want, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 0.005 + 1e-9
    if sample.kind == "count":
        assert chain.answer_words == "3"


def _tiny_tokenizer(tmp_path, texts):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 3),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    (tmp_path / "tok.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer(vocab_file=str(tmp_path / "tok.model"), legacy=False, model_max_length=512)
    tok.pad_token = tok.unk_token
    return tok


def test_llava_lazy_supervised_dataset_reads_the_records(tmp_path, monkeypatch):
    import copy

    from llava import conversation as conversation_lib
    from llava.constants import IGNORE_INDEX
    from llava.train.train import DataArguments, LazySupervisedDataset, preprocess_multimodal
    from transformers import CLIPImageProcessor

    samples = [
        chain_sample(id="a"),
        chain_sample(id="b", kind="count", answer_text="1"),
        chain_sample(id="c", kind="region", steps=[], query="the red circle"),
    ]
    records = [render_record(s) for s in samples]
    Image.new("RGB", (200, 100), (200, 30, 30)).save(tmp_path / "img.png")
    (tmp_path / "data.json").write_text(json.dumps(records))
    monkeypatch.setattr(conversation_lib, "default_conversation", conversation_lib.conv_templates["v1"])
    texts = [t["value"] for r in records for t in r["conversations"]] + [
        conversation_lib.default_conversation.system
    ]
    tok = _tiny_tokenizer(tmp_path, texts)
    args = DataArguments(
        data_path=str(tmp_path / "data.json"),
        is_multimodal=True,
        image_folder=str(tmp_path),
        image_aspect_ratio="pad",
    )
    args.image_processor = CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    )
    args.mm_use_im_start_end = False

    out = preprocess_multimodal(copy.deepcopy([records[0]["conversations"]]), args)
    assert out[0][0]["value"].startswith("<image>\n") and out[0][1] == records[0]["conversations"][1]

    ds = LazySupervisedDataset(str(tmp_path / "data.json"), tok, args)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == (3, 28, 28)
        supervised = item["labels"][item["labels"] != IGNORE_INDEX]
        assert len(supervised) > 0  # a tokenization mismatch would mask everything
        gpt = records[i]["conversations"][1]["value"]
        assert " ".join(gpt.split()) in " ".join(tok.decode(supervised).split())

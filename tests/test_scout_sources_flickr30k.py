"""Flickr30k Entities converter on hand-written Sentences/*.txt and Annotations/*.xml fixtures."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from scout_data.schema import BOX_SLOT, Sample, Skip
from scout_data.sources import flickr30k
from scout_data.validate import record_problems
from scout_data.writer import render_record

ROOT = Path(__file__).parent / "fixtures" / "flickr30k"
SENT, ANN = ROOT / "Sentences", ROOT / "Annotations"
SPLITS = [ROOT / "train.txt", ROOT / "test.txt"]
GUY_LEFT = (115.0, 1.0, 260.0, 374.0)  # VOC <116,2,260,374>: 1-based inclusive
GUY_RIGHT = (301.0, 16.0, 500.0, 375.0)
HAIR = (150.0, 2.0, 200.0, 50.0)


def _run(**kw) -> tuple[dict[str, Sample], dict[str, str]]:
    items = list(flickr30k.convert_flickr30k(SENT, ANN, **kw))
    samples = {x.id: x for x in items if isinstance(x, Sample)}
    skips = {x.ref: x.reason for x in items if isinstance(x, Skip)}
    assert len(samples) + len(skips) == len(items)
    return samples, skips


def test_parse_sentence_extracts_phrases_and_types():
    plain, phrases = flickr30k.parse_sentence(
        "[/EN#1/people/other Two friends] enjoy [/EN#10/other  time ] spent together ."
    )
    assert plain == "Two friends enjoy time spent together ."
    assert [(p.entity_id, p.types, p.text) for p in phrases] == [
        ("1", ["people", "other"], "Two friends"),
        ("10", ["other"], "time"),
    ]
    assert [plain[p.start : p.end] for p in phrases] == ["Two friends", "time"]
    with pytest.raises(ValueError, match="phrase markup"):
        flickr30k.parse_sentence("[/EN#1/people A man walks .")


def test_parse_annotation_voc_boxes_several_per_entity_and_no_box_entities():
    ann = flickr30k.parse_annotation(ANN / "1000092795.xml")
    assert (ann.width, ann.height, ann.file_name) == (500, 375, "1000092795.jpg")
    assert ann.boxes["1"] == [GUY_LEFT, GUY_RIGHT]
    assert ann.boxes["6"] == [GUY_RIGHT], "an <object> with two <name>s boxes both entities"
    assert ann.no_box == {"3", "4"}
    assert "outside the 500x375 image" in ann.bad_boxes["8"]


def test_grounded_caption_puts_all_boxes_after_each_grounded_phrase():
    samples, _ = _run(split_files=SPLITS)
    s = samples["flickr30k_1000092795_0"]
    assert s.kind == "grounded_caption" and s.split == "train" and s.source == "flickr30k"
    assert (s.image, s.width, s.height) == ("1000092795.jpg", 500, 375)
    assert s.answer_text == (
        "Two young guys <box>, <box> with shaggy hair <box> look at their hands"
        " while hanging out in the yard."
    )
    assert s.answer_boxes_xyxy_px == [GUY_LEFT, GUY_RIGHT, HAIR]
    assert [st.boxes_xyxy_px for st in s.steps] == [[GUY_LEFT, GUY_RIGHT], [HAIR]]  # each phrase with its boxes
    assert [st.text for st in s.steps] == [f"Two young guys {BOX_SLOT}, {BOX_SLOT}", f"shaggy hair {BOX_SLOT}"]
    for st in s.steps:
        assert st.text.count(BOX_SLOT) == len(st.boxes_xyxy_px)
    assert [p["entity_id"] for p in s.source_ids["phrases"]] == ["1", "2"]
    gpt = render_record(s)["conversations"][1]["value"]
    assert gpt.splitlines()[-1].startswith(
        "Answer: Two young guys [0.23, 0.13, 0.52, 0.87], [0.60, 0.16, 1.00, 0.87]"
    )
    for x in samples.values():
        assert record_problems(render_record(x)) == [], x.id


def test_multi_type_phrase_and_unknown_entity_stay_plain():
    samples, _ = _run(split_files=SPLITS)
    s = samples["flickr30k_1000092795_4"]
    assert s.answer_text == "Two friends <box>, <box> enjoy time spent together."
    assert s.source_ids["phrases"][0]["types"] == ["people", "other"]


def test_bad_lines_and_images_are_skipped_with_reasons():
    samples, skips = _run(split_files=SPLITS)
    reason = skips["Sentences/1000092795.txt:3"]
    assert "entity 8" in reason and "outside" in reason
    assert skips["Sentences/1000092795.txt:4"] == "no phrase in this caption has a box"
    assert "phrase markup" in skips["Sentences/3000.txt:1"]
    assert "annotation file missing" in skips["Annotations/2000.xml"]
    assert "malformed XML" in skips["Annotations/4000.xml"]
    assert skips["Sentences/999.txt"] == "no sentences file for this image id"
    assert samples["flickr30k_3000_1"].answer_boxes_xyxy_px == [
        (39.0, 119.0, 300.0, 480.0),
        (199.0, 59.0, 260.0, 100.0),
    ]


def test_split_files_name_the_splits_and_default_split_covers_all_files():
    with_splits, _ = _run(split_files=SPLITS)
    assert {s.split for s in with_splits.values()} == {"train"}
    test_only, skips = _run(split_files=[ROOT / "test.txt"])
    assert not test_only and set(skips) == {
        "Annotations/2000.xml",
        "Annotations/4000.xml",
        "Sentences/999.txt",
    }
    everything, _ = _run(split="val")
    assert set(everything) == set(with_splits) and {s.split for s in everything.values()} == {"val"}


def test_missing_image_is_a_skip(tmp_path):
    (tmp_path / "3000.jpg").write_bytes(b"")
    samples, skips = _run(split_files=SPLITS, images_dir=tmp_path)
    assert set(samples) == {"flickr30k_3000_1"}
    assert "1000092795.jpg not found" in skips["Annotations/1000092795.xml"]


def test_missing_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Sentences folder not found"):
        flickr30k.convert_flickr30k(tmp_path / "Sentences", ANN)
    with pytest.raises(FileNotFoundError, match="split file not found"):
        flickr30k.convert_flickr30k(SENT, ANN, split_files=[tmp_path / "val.txt"])


def test_iter_samples_reads_its_own_flags():
    parser = argparse.ArgumentParser()
    flickr30k.add_arguments(parser)
    args = parser.parse_args(
        ["--sentences", str(SENT), "--annotations", str(ANN), "--split-file", str(ROOT / "train.txt")]
    )
    ids = sorted(x.id for x in flickr30k.iter_samples(args) if isinstance(x, Sample))
    assert ids == [
        "flickr30k_1000092795_0",
        "flickr30k_1000092795_1",
        "flickr30k_1000092795_4",
        "flickr30k_3000_1",
    ]

"""COCO instances converter on a hand-written fixture in the official format (tests/fixtures/coco)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from scout_data.schema import BOX_SLOT, Sample, Skip
from scout_data.sources import coco
from scout_data.validate import record_problems
from scout_data.writer import render_record

FIXTURE = Path(__file__).parent / "fixtures" / "coco" / "instances_mini.json"
DOG_BOXES = [(10.0, 100.0, 110.0, 180.0), (300.0, 120.0, 360.0, 170.0), (500.0, 90.0, 630.0, 190.0)]
CAT_BOX = (200.0, 150.0, 260.0, 190.0)


def _run(**kw) -> tuple[dict[str, Sample], dict[str, str]]:
    items = list(coco.convert_coco(FIXTURE, **kw))
    samples = {x.id: x for x in items if isinstance(x, Sample)}
    skips = {x.ref: x.reason for x in items if isinstance(x, Skip)}
    assert len(samples) + len(skips) == len(items), "duplicate sample ids or skip refs"
    return samples, skips


def test_find_all_converts_xywh_to_xyxy_and_lists_every_instance():
    samples, _ = _run()
    s = samples["coco_1_find_18"]
    assert s.kind == "find_all" and s.source == "coco" and s.split == "train"
    assert (s.image, s.width, s.height) == ("000000000001.jpg", 640, 480)
    assert s.answer_boxes_xyxy_px == DOG_BOXES
    assert s.steps[-1].boxes_xyxy_px == DOG_BOXES
    assert s.source_ids == {"image_id": 1, "category_id": 18, "ann_ids": [101, 102, 103]}


def test_count_lists_boxes_then_number():
    samples, _ = _run()
    s = samples["coco_1_count_18"]
    assert s.kind == "count" and s.answer_text == "3"
    assert s.answer_boxes_xyxy_px == DOG_BOXES
    assert [st.text for st in s.steps] == [f"the dogs {BOX_SLOT}, {BOX_SLOT}, {BOX_SLOT}"]  # the answer counts them
    assert s.steps[0].boxes_xyxy_px == DOG_BOXES
    gpt = render_record(s)["conversations"][1]["value"]
    assert (
        gpt.splitlines()[-1]
        == "Answer: 3 [0.02, 0.28, 0.17, 0.41], [0.47, 0.31, 0.56, 0.39], [0.78, 0.27, 0.98, 0.42]"
    )


def test_crowd_annotation_excludes_its_category_for_the_image_with_a_reason():
    samples, skips = _run()
    assert not [s for s in samples.values() if s.source_ids.get("category_id") == 1]
    reason = skips["instances_mini.json:image 1 category person"]
    assert "iscrowd=1" in reason and "ann 106" in reason


def test_zero_area_box_is_skipped_and_its_category_not_used():
    samples, skips = _run()
    assert "zero-area box" in skips["instances_mini.json:ann 301"]
    assert "ann 301" in skips["instances_mini.json:image 3 category car"]
    assert "coco_3_find_3" not in samples and "coco_3_count_3" not in samples


def test_box_out_by_half_a_pixel_is_clamped_and_far_out_box_skipped():
    samples, skips = _run()
    assert samples["coco_3_find_18"].answer_boxes_xyxy_px == [(250.5, 100.0, 320.0, 150.0)]
    assert "outside the 100x100 image" in skips["instances_mini.json:ann 401"]
    assert "coco_4_find_18" not in samples


def test_bad_references_and_empty_images_are_skipped_with_reasons():
    _, skips = _run()
    assert skips["instances_mini.json:image 2"] == "image has no annotations"
    assert "image_id 77" in skips["instances_mini.json:ann 999"]
    assert "category_id 99" in skips["instances_mini.json:ann 402"]


def test_relation_chain_locates_the_candidates_then_the_reference_object_then_picks():
    samples, _ = _run()
    rel = [s for s in samples.values() if "_rel_" in s.id]
    assert [s.id for s in rel] == ["coco_1_rel_18_left_17"], "right/above/below are ambiguous in the fixture"
    s = rel[0]
    assert s.kind == "refexp" and s.difficulty == "hard"
    assert "dog" in s.query and "to the left of the cat" in s.query
    assert [st.text for st in s.steps] == [f"the dogs {BOX_SLOT}, {BOX_SLOT}, {BOX_SLOT}",
                                           f"the reference object {BOX_SLOT}", f"the one it asks for: {BOX_SLOT}"]
    assert s.steps[0].boxes_xyxy_px == DOG_BOXES
    assert s.steps[1].boxes_xyxy_px == [CAT_BOX]
    assert s.steps[2].boxes_xyxy_px == [DOG_BOXES[0]] == s.answer_boxes_xyxy_px
    assert s.source_ids["answer_ann_id"] == 101 and s.source_ids["anchor_ann_id"] == 104
    for step in s.steps:
        assert step.text.count(BOX_SLOT) == len(step.boxes_xyxy_px)


def test_superlatives_pick_the_clear_winner():
    samples, _ = _run(max_superlatives=3)
    assert samples["coco_1_largest_18"].answer_boxes_xyxy_px == [DOG_BOXES[2]]
    assert samples["coco_1_leftmost_18"].answer_boxes_xyxy_px == [DOG_BOXES[0]]
    assert samples["coco_1_rightmost_18"].answer_boxes_xyxy_px == [DOG_BOXES[2]]
    largest = samples["coco_1_largest_18"]
    assert largest.steps[0].boxes_xyxy_px == DOG_BOXES and largest.steps[1].boxes_xyxy_px == [DOG_BOXES[2]]
    assert largest.steps[1].text == f"the one it asks for: {BOX_SLOT}"
    assert not any("_largest_17" in i for i in samples), "a single cat has no superlative"
    default, _ = _run()
    assert sum("most_" in i or "_largest_" in i for i in default) == 2


def test_output_is_deterministic_per_seed_and_every_record_validates():
    a, _ = _run(seed=3)
    b, _ = _run(seed=3)
    assert [render_record(s) for s in a.values()] == [render_record(s) for s in b.values()]
    for s in a.values():
        assert record_problems(render_record(s)) == [], s.id


def test_limits_and_task_selection():
    samples, skips = _run(max_instances=2)
    assert "coco_1_find_18" not in samples
    assert "3 instances is more than --max-instances 2" in skips["instances_mini.json:image 1 category dog"]
    only_count, _ = _run(tasks=["count"])
    assert only_count and all(s.kind == "count" for s in only_count.values())
    with pytest.raises(ValueError, match="unknown COCO task"):
        coco.parse_tasks("count,colour")


def test_missing_image_file_is_a_skip(tmp_path):
    (tmp_path / "000000000001.jpg").write_bytes(b"")
    samples, skips = _run(images_dir=tmp_path)
    assert "coco_1_find_18" in samples
    assert "000000000003.jpg not found" in skips["instances_mini.json:image 3"]


def test_iter_samples_reads_its_own_flags():
    parser = argparse.ArgumentParser()
    coco.add_arguments(parser)
    args = parser.parse_args(["--instances", str(FIXTURE), "--split", "val", "--tasks", "find_all"])
    args.seed = 0
    items = [x for x in coco.iter_samples(args) if isinstance(x, Sample)]
    assert items and {x.split for x in items} == {"val"} and {x.kind for x in items} == {"find_all"}


def test_bad_input_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        list(coco.convert_coco(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        list(coco.convert_coco(broken))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match="partial.json lacks a 'annotations' list"):
        list(coco.convert_coco(partial))


def test_malformed_annotation_records_and_tiny_boxes_are_skips(tmp_path):
    data = json.loads(FIXTURE.read_text())
    data["annotations"] += [
        "garbage",
        {"id": 500, "bbox": [1, 1, 5, 5], "category_id": 18},
        {"id": 501, "image_id": 3, "category_id": 17, "bbox": [100, 100, 1.5, 1.5], "iscrowd": 0},
        {"id": 502, "image_id": 3, "category_id": 17, "bbox": [10, 10, "wide", 5], "iscrowd": 0},
    ]
    path = tmp_path / "instances_extra.json"
    path.write_text(json.dumps(data))
    items = list(coco.convert_coco(path))
    skips = {x.ref: x.reason for x in items if isinstance(x, Skip)}
    assert skips["instances_extra.json:annotations[12]"] == "annotation is not an object with an 'id'"
    assert skips["instances_extra.json:ann 500"] == "annotation lacks an image_id or category_id"
    assert "too small to show at 2 decimals" in skips["instances_extra.json:ann 501"]
    assert "is not 4 numbers" in skips["instances_extra.json:ann 502"]
    assert "ann 501" in skips["instances_extra.json:image 3 category cat"]
    assert "coco_1_find_18" in {x.id for x in items if isinstance(x, Sample)}

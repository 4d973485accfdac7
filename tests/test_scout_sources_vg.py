"""Visual Genome converter on hand-written region_descriptions / objects / image_data fixtures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from scout_data.schema import BOX_SLOT, Sample, Skip
from scout_data.sources import vg
from scout_data.validate import record_problems
from scout_data.writer import render_record

ROOT = Path(__file__).parent / "fixtures" / "vg"
IMAGE_DATA, REGIONS, OBJECTS = (
    ROOT / "image_data.json",
    ROOT / "region_descriptions.json",
    ROOT / "objects.json",
)
MAN_A, MAN_B = (200.0, 100.0, 350.0, 500.0), (500.0, 150.0, 620.0, 450.0)


def _run(**kw) -> tuple[dict[str, Sample], dict[str, str]]:
    items = list(vg.convert_vg(IMAGE_DATA, **kw))
    samples = {x.id: x for x in items if isinstance(x, Sample)}
    skips = {x.ref: x.reason for x in items if isinstance(x, Skip)}
    assert len(samples) + len(skips) == len(items)
    return samples, skips


def test_regions_become_region_samples_with_exact_boxes():
    samples, _ = _run(regions=REGIONS)
    assert sorted(samples) == ["vg_region_11", "vg_region_13", "vg_region_21"]
    s = samples["vg_region_11"]
    assert (s.kind, s.query, s.steps) == ("region", "a man riding a horse", [])
    assert s.answer_boxes_xyxy_px == [(200.0, 100.0, 500.0, 500.0)]
    assert (s.image, s.width, s.height) == ("VG_100K_2/1.jpg", 800, 600)
    assert samples["vg_region_21"].answer_boxes_xyxy_px == [(399.5, 50.0, 499.5, 170.0)]
    assert samples["vg_region_21"].image == "VG_100K/2.jpg"
    gpt = render_record(s)["conversations"][1]["value"]
    assert gpt == "[0.25, 0.25, 0.62, 0.75]"


def test_box_quirks_negative_corner_clamped_far_out_skipped():
    samples, skips = _run(regions=REGIONS)
    assert samples["vg_region_13"].answer_boxes_xyxy_px == [(0.0, 0.0, 249.0, 79.5)]
    assert "outside the 800x600 image" in skips["region_descriptions.json:region 14"]


def test_duplicate_and_ambiguous_regions_are_skipped():
    _, skips = _run(regions=REGIONS)
    assert skips["region_descriptions.json:region 12"] == "duplicate of region 11 (same phrase and box)"
    assert "ambiguous phrase" in skips["region_descriptions.json:region 15"]
    assert "[15]" in skips["region_descriptions.json:region 16"]
    assert skips["region_descriptions.json:region 17"] == "region has no phrase"
    assert "image 3 is not in image_data.json" in skips["region_descriptions.json:image 3"]


def test_refexp_region_kind_adds_a_chain():
    samples, _ = _run(regions=REGIONS, region_kind="refexp")
    s = samples["vg_region_11"]
    assert s.kind == "refexp" and len(s.steps) == 1  # no candidates annotated: the pick is the chain
    assert s.steps[0].text == f"the one it asks for: {BOX_SLOT}"
    assert s.steps[0].boxes_xyxy_px == s.answer_boxes_xyxy_px == [(200.0, 100.0, 500.0, 500.0)]
    assert record_problems(render_record(s)) == []


def test_objects_find_all_and_count_per_name():
    samples, skips = _run(objects=OBJECTS)
    find, count = samples["vg_1_find_man"], samples["vg_1_count_man"]
    assert find.kind == "find_all" and find.answer_boxes_xyxy_px == [MAN_A, MAN_B]
    assert count.answer_text == "2" and count.answer_boxes_xyxy_px == [MAN_A, MAN_B]
    assert find.source_ids == {"image_id": 1, "name": "man", "object_ids": [101, 102]}
    assert [st.text for st in find.steps] == [st.text for st in count.steps] == [f"the men {BOX_SLOT}, {BOX_SLOT}"]
    assert samples["vg_1_count_horse"].answer_boxes_xyxy_px == [(180.0, 250.0, 480.0, 500.0)]
    assert "duplicate of object 101" in skips["objects.json:object 103"]
    assert "outside" in skips["objects.json:object 106"]
    assert "[106]" in skips["objects.json:image 1 name sign"] and "vg_1_find_sign" not in samples
    assert "plural" in skips["objects.json:image 1 name trees"]
    assert skips["objects.json:object 108"] == "object has no name"
    assert "image size 0x333" in skips["objects.json:image 4"]
    for x in samples.values():
        assert record_problems(render_record(x)) == [], x.id


def test_object_tasks_and_limits():
    samples, _ = _run(objects=OBJECTS, object_tasks=["count"])
    assert samples and {s.kind for s in samples.values()} == {"count"}
    _, skips = _run(objects=OBJECTS, max_instances=1)
    assert "2 objects is more than --max-instances 1" in skips["objects.json:image 1 name man"]


def test_flat_image_folder_is_found_and_missing_images_skipped(tmp_path):
    (tmp_path / "1.jpg").write_bytes(b"")
    samples, skips = _run(regions=REGIONS, images_dir=tmp_path)
    assert samples["vg_region_11"].image == "1.jpg"
    assert "VG_100K/2.jpg not found" in skips["region_descriptions.json:image 2"]


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--regions and/or --objects"):
        vg.convert_vg(IMAGE_DATA)
    with pytest.raises(FileNotFoundError, match="objects file not found"):
        vg.convert_vg(IMAGE_DATA, objects=tmp_path / "objects.json")
    notlist = tmp_path / "image_data.json"
    notlist.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="must hold a JSON list"):
        vg.convert_vg(notlist, regions=REGIONS)
    broken = tmp_path / "regions.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="regions.json is not valid JSON"):
        list(vg.convert_vg(IMAGE_DATA, regions=broken))


def test_iter_samples_reads_its_own_flags():
    parser = argparse.ArgumentParser()
    vg.add_arguments(parser)
    args = parser.parse_args(
        [
            "--image-data",
            str(IMAGE_DATA),
            "--objects",
            str(OBJECTS),
            "--object-tasks",
            "find_all",
            "--split",
            "val",
        ]
    )
    items = [x for x in vg.iter_samples(args) if isinstance(x, Sample)]
    assert sorted(x.id for x in items) == ["vg_1_find_horse", "vg_1_find_man"]
    assert {x.split for x in items} == {"val"}


def test_malformed_entries_are_skips(tmp_path):
    regions = tmp_path / "region_descriptions.json"
    regions.write_text(
        json.dumps(["junk", {"id": [1], "regions": [{"region_id": 5}]}, {"id": 2, "regions": [7]}])
    )
    _, skips = _run(regions=regions)
    assert skips["region_descriptions.json:#0"] == "entry is not an object with a 'regions' list"
    assert "image id [1] is not an id" in skips["region_descriptions.json:image [1]"]
    assert skips["region_descriptions.json:region 2#0"] == "region is not an object"

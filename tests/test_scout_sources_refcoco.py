"""RefCOCO converter: refs pickles built here (protocol 2, as refer ships them) + instances fixture."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
from pathlib import Path

import pytest

from scout_data.schema import BOX_SLOT, Sample, Skip
from scout_data.sources import refcoco
from scout_data.validate import record_problems
from scout_data.writer import render_record

FIXTURES = Path(__file__).parent / "fixtures" / "refcoco"
INSTANCES = FIXTURES / "instances.json"
REFS = json.loads((FIXTURES / "refs(unc).json").read_text())
PERSON_LEFT = (20.5, 60.25, 180.5, 420.25)
PERSON_MIDDLE = (250.0, 100.0, 330.0, 300.0)
PERSON_RIGHT = (420.0, 50.0, 600.0, 427.0)


def _refs_file(tmp_path: Path, refs=REFS, folder: str = "refcoco", name: str = "refs(unc).p") -> Path:
    path = tmp_path / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return path


def _run(refs_path: Path, **kw) -> tuple[dict[str, Sample], dict[str, str]]:
    items = list(refcoco.convert_refcoco(refs_path, INSTANCES, **kw))
    samples = {x.id: x for x in items if isinstance(x, Sample)}
    skips = {x.ref: x.reason for x in items if isinstance(x, Skip)}
    assert len(samples) + len(skips) == len(items)
    return samples, skips


def _py2_pickle(obj) -> bytes:
    """Protocol-2 pickle as Python 2 wrote it: ``str`` as byte strings (SHORT_BINSTRING/BINSTRING)."""
    out = bytearray(b"\x80\x02")

    def put(o) -> None:
        if isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, str):
            raw = o.encode("latin1")
            out.extend((b"U" + bytes([len(raw)])) if len(raw) < 256 else (b"T" + struct.pack("<i", len(raw))))
            out.extend(raw)
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                put(v)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                put(k)
                put(v)
            out.extend(b"u")
        else:
            raise TypeError(o)

    put(obj)
    return bytes(out + b".")


def test_each_sentence_becomes_a_sample_with_official_split(tmp_path):
    samples, _ = _run(_refs_file(tmp_path))
    assert sorted(samples) == sorted(
        [
            "refcoco_0_0",
            "refcoco_0_1",
            "refcoco_1_2",
            "refcoco_1_3",
            "refcoco_1_4",
            "refcoco_3_6",
            "refcoco_4_8",
        ]
    )
    assert {samples[i].split for i in ("refcoco_1_2", "refcoco_1_3", "refcoco_1_4")} == {"testA"}
    assert (samples["refcoco_0_0"].split, samples["refcoco_3_6"].split, samples["refcoco_4_8"].split) == (
        "train",
        "testB",
        "val",
    )
    assert '"tallest person"' in samples["refcoco_1_4"].query


def test_boxes_are_exact_and_chain_locates_the_candidates_then_picks(tmp_path):
    samples, _ = _run(_refs_file(tmp_path))
    s = samples["refcoco_0_1"]
    assert s.kind == "refexp" and s.source == "refcoco"
    assert (s.image, s.width, s.height) == ("COCO_train2014_000000581857.jpg", 640, 427)
    assert s.answer_boxes_xyxy_px == [PERSON_LEFT]
    # SCOUT's step grammar: the referent's category with every candidate's box, then the pick
    assert [st.text for st in s.steps] == [f"the people {BOX_SLOT}, {BOX_SLOT}, {BOX_SLOT}",
                                           f"the one it asks for: {BOX_SLOT}"]
    assert s.steps[0].boxes_xyxy_px == [PERSON_LEFT, PERSON_MIDDLE, PERSON_RIGHT], (
        "crowd region 1004 is no candidate"
    )
    assert s.steps[1].boxes_xyxy_px == [PERSON_LEFT]
    assert samples["refcoco_1_3"].steps[1].boxes_xyxy_px == [PERSON_RIGHT]
    assert samples["refcoco_4_8"].answer_boxes_xyxy_px == [PERSON_MIDDLE]
    for step in s.steps:
        assert step.text.count(BOX_SLOT) == len(step.boxes_xyxy_px)
    assert s.source_ids == {
        "dataset": "refcoco",
        "ref_id": 0,
        "ann_id": 1001,
        "image_id": 581857,
        "category_id": 1,
        "candidate_ann_ids": [1001, 1003, 1002],
        "sent_id": 1,
    }
    capped, _ = _run(_refs_file(tmp_path / "capped"), max_candidates=2)  # the referent and the largest other
    assert capped["refcoco_0_1"].steps[0].text == f"2 of the 3 people {BOX_SLOT}, {BOX_SLOT}"
    giraffe = samples["refcoco_3_6"]
    assert giraffe.difficulty == "simple" and [st.text for st in giraffe.steps] == [f"the giraffe {BOX_SLOT}"]
    assert giraffe.steps[0].boxes_xyxy_px == giraffe.answer_boxes_xyxy_px == [(60.0, 30.0, 380.0, 620.0)]
    for x in samples.values():
        assert record_problems(render_record(x)) == [], x.id


def test_missing_annotation_and_empty_sentence_are_skipped_with_file_and_id(tmp_path):
    _, skips = _run(_refs_file(tmp_path))
    assert "ann_id 9999 is not in the instances file" in skips["refs(unc).p:ref 2"]
    assert skips["refs(unc).p:ref 4 sent 7"] == "sentence has no text"


def test_split_filter_keeps_only_named_splits(tmp_path):
    samples, skips = _run(_refs_file(tmp_path), splits=["testA", "testB"])
    assert {s.split for s in samples.values()} == {"testA", "testB"}
    assert len(samples) == 4 and not skips


def test_dataset_name_sets_id_prefix(tmp_path):
    samples, _ = _run(_refs_file(tmp_path, folder="refcoco+"))
    assert "refcocop_1_2" in samples and samples["refcocop_1_2"].source_ids["dataset"] == "refcocop"
    g, _ = _run(_refs_file(tmp_path, folder="data", name="refs(umd).p"))
    assert "refcocog_0_0" in g
    assert refcoco.dataset_name("x/refs(unc).p", "refcoco+") == "refcocop"
    with pytest.raises(ValueError, match="unknown RefCOCO dataset"):
        refcoco.dataset_name("x/refs(unc).p", "refclef")


def test_image_file_name_drops_the_annotation_suffix(tmp_path):
    assert (
        refcoco.image_file_from_ref("COCO_train2014_000000581857_16.jpg") == "COCO_train2014_000000581857.jpg"
    )
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "COCO_train2014_000000581857.jpg").write_bytes(b"")
    samples, skips = _run(_refs_file(tmp_path), images_dir=tmp_path / "images")
    assert "refcoco_0_0" in samples
    assert "COCO_train2014_000000000025.jpg not found" in skips["refs(unc).p:ref 3"]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_globals(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "refs(evil).p"
    bad.write_bytes(pickle.dumps([{"ref_id": 0, "sentences": [_Exploit(marker)]}], protocol=2))
    with pytest.raises(
        refcoco.UnsafePickleError, match=r"refs\(evil\)\.p.*refusing to load global (posix|os|nt)\.system"
    ):
        refcoco.load_refs_pickle(bad)
    with pytest.raises(ValueError, match="refusing"):
        refcoco.convert_refcoco(bad, INSTANCES)
    assert not marker.exists()
    sets = tmp_path / "sets.p"
    sets.write_bytes(pickle.dumps([{1, 2}], protocol=2))
    with pytest.raises(refcoco.UnsafePickleError, match=r"(__builtin__|builtins)\.set"):
        refcoco.load_refs_pickle(sets)


def test_python2_byte_strings_load_with_latin1_fallback(tmp_path):
    refs = [dict(r) for r in REFS[:1]]
    refs[0]["sentences"] = [
        {"tokens": ["caf\xe9"], "raw": "caf\xe9 man", "sent_id": 0, "sent": "caf\xe9 man"}
    ]
    path = tmp_path / "refcoco" / "refs(unc).p"
    path.parent.mkdir()
    path.write_bytes(_py2_pickle(refs))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())
    assert refcoco.load_refs_pickle(path)[0]["sentences"][0]["sent"] == "caf\xe9 man"
    samples, _ = _run(path)
    assert '"caf\xe9 man"' in samples["refcoco_0_0"].query
    ascii_path = tmp_path / "ascii.p"
    ascii_path.write_bytes(_py2_pickle(REFS))
    assert refcoco.load_refs_pickle(ascii_path) == REFS


def test_bad_refs_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.p"):
        refcoco.load_refs_pickle(tmp_path / "nope.p")
    trunc = tmp_path / "trunc.p"
    trunc.write_bytes(pickle.dumps(REFS, protocol=2)[:50])
    with pytest.raises(ValueError, match="trunc.p could not be read"):
        refcoco.load_refs_pickle(trunc)
    notlist = tmp_path / "dict.p"
    notlist.write_bytes(pickle.dumps({"refs": []}, protocol=2))
    with pytest.raises(ValueError, match="dict.p must hold a list"):
        refcoco.load_refs_pickle(notlist)


def test_malformed_refs_become_skips(tmp_path):
    refs = [REFS[0], "not a ref", {"ref_id": 9, "split": "val"}, {**REFS[0], "ref_id": 10, "ann_id": [1001]}]
    _, skips = _run(_refs_file(tmp_path, refs=refs))
    assert skips["refs(unc).p:ref #1"] == "ref is a str, not a dict"
    assert skips["refs(unc).p:ref 9"] == "ref lacks ann_id, image_id, sentences"
    assert "ann_id [1001]" in skips["refs(unc).p:ref 10"]


def test_iter_samples_reads_its_own_flags(tmp_path):
    parser = argparse.ArgumentParser()
    refcoco.add_arguments(parser)
    args = parser.parse_args(
        ["--refs", str(_refs_file(tmp_path)), "--instances", str(INSTANCES), "--splits", "val,testB"]
    )
    items = [x for x in refcoco.iter_samples(args) if isinstance(x, Sample)]
    assert sorted(x.id for x in items) == ["refcoco_3_6", "refcoco_4_8"]


def test_one_shot_rec_records_beside_the_chains(tmp_path):
    samples, _ = _run(_refs_file(tmp_path), kinds=("refexp", "region"))
    chains = {k: v for k, v in samples.items() if v.kind == "refexp"}
    one_shot = {k: v for k, v in samples.items() if v.kind == "region"}
    assert sorted(one_shot) == sorted(f"{k}_rec" for k in chains)
    for sid, chain in chains.items():
        rec = one_shot[f"{sid}_rec"]
        assert rec.steps == [] and rec.answer_boxes_xyxy_px == chain.answer_boxes_xyxy_px
        assert rec.query == rec.expression == chain.expression and rec.split == chain.split
        record = render_record(rec)
        assert record_problems(record) == []
        human, gpt = (t["value"] for t in record["conversations"])
        assert human == f"<image>\nPlease provide the bounding box coordinate of the region this sentence " \
                        f"describes: {rec.expression}."
        assert gpt.startswith("[") and gpt.count("[") == 1  # one box, no steps
    only, _ = _run(_refs_file(tmp_path), kinds=("region",))
    assert set(only) == set(one_shot)


@pytest.mark.parametrize("kinds", ["chain", "refexp,refexp", ""])
def test_unknown_kinds_are_refused_by_the_parser(tmp_path, kinds, capsys):
    parser = argparse.ArgumentParser()
    refcoco.add_arguments(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--refs", "r.p", "--instances", "i.json", "--kinds", kinds])
    assert exc.value.code == 2 and "expected a comma list of refexp, region" in capsys.readouterr().err

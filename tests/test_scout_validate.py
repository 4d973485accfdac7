"""validate: each kind of bad record is caught, reported as file:index id=... reason, exit non-zero."""

from __future__ import annotations

import copy
import json

import pytest
from PIL import Image

from scout_data.cli import main
from scout_data.validate import DataError, load_records, record_problems, validate_file

GOOD = {
    "id": "r0",
    "image": "a.png",
    "task": "grounding",
    "conversations": [
        {"from": "human", "value": "<image>\nWhere is the red circle? Answer step by step."},
        {
            "from": "gpt",
            "value": "Step 1: I see a red circle [0.10, 0.20, 0.30, 0.40].\nAnswer: [0.10, 0.20, 0.30, 0.40]",
        },
    ],
}


def bad(**changes):
    rec = copy.deepcopy(GOOD)
    for k, v in changes.items():
        if v is None:
            rec.pop(k)
        else:
            rec[k] = v
    return rec


def gpt(value):
    return bad(conversations=[GOOD["conversations"][0], {"from": "gpt", "value": value}])


BAD_CASES = {
    "not an object": ([1, 2], "not an object"),
    "missing id": (bad(id=None), "missing 'id'"),
    "no conversations": (bad(conversations=[]), "non-empty list"),
    "gpt first": (bad(conversations=GOOD["conversations"][::-1]), "roles alternate"),
    "two humans": (bad(conversations=[GOOD["conversations"][0]] * 2), "roles alternate"),
    "no gpt turn": (bad(conversations=GOOD["conversations"][:1]), "no gpt turn"),
    "no image token": (
        bad(conversations=[{"from": "human", "value": "Where?"}, GOOD["conversations"][1]]),
        "exactly 1",
    ),
    "two image tokens": (
        bad(conversations=[{"from": "human", "value": "<image>\n<image> Where?"}, GOOD["conversations"][1]]),
        "exactly 1",
    ),
    "token without image": (bad(image=None), "without 'image'"),
    "token in gpt": (gpt("<image> Answer: [0.1, 0.2, 0.3, 0.4]"), "after the first human turn"),
    "unparseable box": (gpt("Step 1: a.\nAnswer: [0.1, 0.2, 0.3]"), "unparseable box"),
    "outside": (gpt("Step 1: a.\nAnswer: [0.1, 0.2, 1.3, 0.4]"), "box outside [0, 1]"),
    "degenerate": (gpt("Step 1: a.\nAnswer: [0.3, 0.2, 0.3, 0.4]"), "degenerate box"),
    "order": (gpt("Step 1: a.\nStep 3: b.\nAnswer: [0.1, 0.2, 0.3, 0.4]"), "steps out of order"),
    "no answer": (gpt("Step 1: a [0.1, 0.2, 0.3, 0.4]."), "no answer line"),
    "stored boxes disagree": (bad(answer_boxes_xyxy_norm=[[0.5, 0.5, 0.6, 0.6]]), "answer box in the text"),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_record_problems_catches(name):
    rec, reason = BAD_CASES[name]
    problems = record_problems(rec)
    assert any(reason in p for p in problems), problems


def test_good_records_pass_including_untagged_and_understanding():
    assert record_problems(GOOD) == []
    assert record_problems(bad(task=None)) == []
    text_only = {
        "id": 3,
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "[1, 2, 3]"}],
    }
    assert record_problems({**text_only, "task": "understanding"}) == []
    assert record_problems(text_only) == []  # untagged: only 4-number boxes are checked
    assert any(
        "coordinates not normalised" in p  # pixels, not fractions of the image
        for p in record_problems(
            bad(
                task=None,
                conversations=[
                    GOOD["conversations"][0],
                    {"from": "gpt", "value": "It is at [10, 20, 30, 40]."},
                ],
            )
        )
    )


def test_images_must_exist_open_and_match_size(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert record_problems(GOOD, str(tmp_path)) == []
    assert any("image not found" in p for p in record_problems(bad(image="missing.png"), str(tmp_path)))
    assert any("does not open" in p for p in record_problems(bad(image="broken.png"), str(tmp_path)))
    assert any("image_size" in p for p in record_problems(bad(image_size=[10, 20]), str(tmp_path)))


def test_validate_file_and_cli_report_each_bad_record(tmp_path, capsys):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    records = [GOOD, BAD_CASES["outside"][0], BAD_CASES["order"][0], GOOD]
    records = [{**r, "id": f"r{i}"} for i, r in enumerate(records)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=1))
    n, bad_records = validate_file(str(path), str(tmp_path))
    assert n == 4 and [b.index for b in bad_records] == [1, 2]
    assert str(bad_records[0]).startswith(f"{path}:1 id=r1 box outside")
    assert main(["validate", str(path), "--image-folder", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert f"{path}:2 id=r2 steps out of order" in out.out and "4 records, 2 bad" in out.err
    good = tmp_path / "good.json"
    good.write_text(json.dumps([GOOD]))
    assert main(["validate", str(good), "--image-folder", str(tmp_path)]) == 0


def test_malformed_json_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": 1,\n   "conversations": [}\n]')
    with pytest.raises(DataError, match=r"broken\.json:3:\d+: malformed JSON"):
        load_records(str(path))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.json:3:" in err and "Traceback" not in err
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="top level must be a JSON list"):
        load_records(str(tmp_path / "obj.json"))
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.json"))


def test_validate_reports_what_a_consumer_would_refuse(tmp_path, capsys):
    """Duplicate ids, ``1`` beside ``"1"`` (one id as text) and an unknown task passed as "0 bad"."""
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    records = [{**GOOD, "id": "r0"}, {**GOOD, "id": "r0"}, {**GOOD, "id": 1}, {**GOOD, "id": "1"},
               {**GOOD, "id": "w", "task": "weird"}, {**GOOD, "id": [1]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    before = path.read_bytes()
    assert main(["validate", str(path), "--image-folder", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert f"{path}:1 id=r0 id 'r0' repeats record 0's id 'r0'" in out.out
    assert f"{path}:3 id=1 id '1' repeats record 2's id 1 (ids are compared as text)" in out.out
    assert "task 'weird' is not one of grounding, understanding (training refuses it)" in out.out
    assert "id [1] must be a string or an integer" in out.out
    assert "6 records, 4 bad" in out.err and path.read_bytes() == before

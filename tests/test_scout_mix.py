"""Replay mixing: ratio, task tags, unique ids, seeded shuffle, inputs untouched."""

from __future__ import annotations

import copy
import json

import pytest

from scout_data.cli import main
from scout_data.mix import mix_records, replay_count


def turns(image: bool = True) -> list[dict[str, str]]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + "What is it?"}, {"from": "gpt", "value": "A"}]


def scout(n):
    return [{"id": f"s{i}", "image": f"train/s{i}.png", "task": "grounding", "conversations": turns()}
            for i in range(n)]


def replay(n):
    recs = [{"id": f"r{i}", "image": f"coco/train2017/{i}.jpg", "conversations": turns()} for i in range(n)]
    recs.append({"id": "s0", "conversations": turns(image=False)})  # clashes with a SCOUT id, and has no image
    recs.append({"id": "t", "task": "grounding", "conversations": turns(image=False)})  # already tagged: kept
    return recs


def test_ratio_tags_and_unique_ids():
    s, r = scout(50), replay(100)
    s0, r0 = copy.deepcopy(s), copy.deepcopy(r)
    mixed = mix_records(s, r, ratio=0.2, seed=0, scout_image_prefix="scout/images")
    assert s == s0 and r == r0
    assert len(mixed) == 60
    assert len({m["id"] for m in mixed}) == 60
    assert sum(m["task"] == "grounding" for m in mixed) in (50, 51)
    assert all("task" in m for m in mixed)
    assert {m["image"] for m in mixed if m["id"] == "s3"} == {"scout/images/train/s3.png"}
    assert mixed == mix_records(s, r, ratio=0.2, seed=0, scout_image_prefix="scout/images")
    assert [m["id"] for m in mixed] != [m["id"] for m in mix_records(s, r, ratio=0.2, seed=1)]


def test_fraction_and_repeats():
    assert replay_count(100, replay_fraction=0.5) == 100
    assert replay_count(100, ratio=0.25) == 25
    with pytest.raises(ValueError):
        replay_count(10)
    with pytest.raises(ValueError):
        replay_count(10, replay_fraction=1.0)
    mixed = mix_records(scout(10), replay(3), ratio=1.2, seed=0)  # 12 replay from 5: passes repeat
    ids = [m["id"] for m in mixed]
    assert len(mixed) == 22 and len(set(ids)) == 22
    n_t = sum(i.startswith("t") for i in ids)  # the pre-tagged replay record keeps its "grounding"
    assert n_t >= 2 and sum(m["task"] == "understanding" for m in mixed) == 12 - n_t
    assert any("#r1" in i for i in ids) and any("#r2" in i for i in ids)


def test_cli_mix_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps(scout(10)))
    (tmp_path / "r.json").write_text(json.dumps(replay(20)))
    args = [
        "mix",
        "--scout",
        str(tmp_path / "s.json"),
        "--replay",
        str(tmp_path / "r.json"),
        "--ratio",
        "0.5",
    ]
    assert main([*args, "--out", str(tmp_path / "m.json")]) == 0
    mixed = json.loads((tmp_path / "m.json").read_text())
    assert len(mixed) == 15 and {m["task"] for m in mixed} == {"grounding", "understanding"}
    assert main([*args, "--out", str(tmp_path / "m.json")]) == 2
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "r.json").read_text())) == 22
    assert main([*args, "--out", str(tmp_path / "m.json"), "--overwrite", "--seed", "3"]) == 0

"""The CLI: synth end to end, refusal to overwrite, resume (also after an interruption), preview,
lazy source imports."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from scout_data.cli import main
from scout_data.sources import synthetic

FLAGS = ["--image-size", "64", "--quiet", "--kinds", "refexp:1,count:1,region:1,qa:1"]


def synth(out, num, *extra):
    return main(["synth", "--out", str(out), "--num", str(num), *FLAGS, *extra])


def read(out, split="train"):
    return (out / f"{split}.json").read_bytes()


def test_synth_writes_splits_images_and_summary(tmp_path, capsys):
    out = tmp_path / "d"
    assert synth(out, 20) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == {"test": 1, "train": 18, "val": 1}
    assert summary["image_folder"] == str((out / "images").resolve())
    assert summary["skipped"]["total"] == 0 and summary["box_frame"] == "padded"
    assert not (out / "shards").exists()
    recs = json.loads(read(out))
    assert all((out / "images" / r["image"]).is_file() for r in recs)
    assert "--image_folder" in capsys.readouterr().out
    assert main(["validate", str(out / "train.json"), "--image-folder", str(out / "images")]) == 0
    assert main(["stats", str(out / "train.json")]) == 0
    assert '"records": 18' in capsys.readouterr().out


def test_refuses_non_empty_out_without_resume(tmp_path, capsys):
    out = tmp_path / "d"
    assert synth(out, 5) == 0
    before = read(out)
    assert synth(out, 5) == 2
    assert "not empty" in capsys.readouterr().err
    assert read(out) == before


def test_resume_skips_finished_ids_and_ends_like_a_fresh_run(tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    assert synth(fresh, 40, "--frame", "original") == 0

    calls = []
    real = synthetic.records.make_record

    def interrupted(job, cfg):
        if len(calls) == 23:
            raise KeyboardInterrupt
        calls.append(job.index)
        return real(job, cfg)

    out = tmp_path / "resumed"
    monkeypatch.setattr(synthetic.records, "make_record", interrupted)
    assert synth(out, 40, "--frame", "original", "--shard-size", "5") == 130
    assert not (out / "train.json").exists() and len(list((out / "shards").glob("train-*.json"))) == 4

    calls.clear()
    monkeypatch.setattr(
        synthetic.records, "make_record", lambda job, cfg: (calls.append(job.index), real(job, cfg))[1]
    )
    assert synth(out, 40, "--frame", "original", "--shard-size", "5", "--resume") == 0
    assert len(calls) == 40 - 20  # the 20 ids in shards were not generated again
    for split in ("train", "val", "test"):
        assert read(out, split) == read(fresh, split)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["already_done"] == 0 and sum(summary["written_this_run"].values()) == 20

    calls.clear()
    assert synth(out, 40, "--frame", "original", "--resume") == 0
    assert calls == [] and read(out) == read(fresh)


def test_preview_writes_a_png(tmp_path):
    out = tmp_path / "d"
    assert (
        main(
            [
                "synth",
                "--out",
                str(out),
                "--num",
                "4",
                "--image-size",
                "96x64",
                "--quiet",
                "--kinds",
                "find_all:1",
            ]
        )
        == 0
    )
    png = tmp_path / "p.png"
    assert (
        main(
            [
                "preview",
                str(out / "train.json"),
                "--image-folder",
                str(out / "images"),
                "--index",
                "1",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    im = Image.open(png)
    assert im.format == "PNG" and im.width == 96 and im.height > 64
    assert (
        main(
            [
                "preview",
                str(out / "train.json"),
                "--image-folder",
                str(out / "images"),
                "--id",
                "nope",
                "--out",
                str(png),
            ]
        )
        == 2
    )


def test_a_broken_source_module_does_not_break_the_others(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "scout_data.sources.coco", None)  # import now raises ImportError
    assert main(["coco", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "source 'coco' is not available" in err and "Traceback" not in err
    assert synth(tmp_path / "s", 3) == 0
    assert synth(tmp_path / "bad", 3, "--kinds", "nonsense") == 2
    assert "unknown kind" in capsys.readouterr().err


def test_module_entry_point_help():
    res = subprocess.run(
        [sys.executable, "-m", "scout_data", "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0
    for cmd in ("synth", "coco", "refcoco", "flickr30k", "vg", "mix", "validate", "stats", "preview"):
        assert cmd in res.stdout


def test_a_run_that_failed_before_writing_does_not_block_the_next(tmp_path, monkeypatch):
    out = tmp_path / "d"

    def broken(args):
        raise OSError("the source could not be read")
        yield  # a generator, as the sources are

    monkeypatch.setattr(synthetic, "iter_samples", broken)
    assert synth(out, 4) == 2
    assert not out.exists()  # it made the folder and wrote no record: it leaves nothing
    monkeypatch.undo()
    assert synth(out, 4, "--seed", "3") == 0  # another command, without --resume: the folder counts as empty

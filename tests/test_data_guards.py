"""Nothing lost, nothing silently wrong (issue 38): one writer per output (locks), no stray temporaries after a
kill, bounded work, and the scorers' input schema. Every check runs the command (in this process, as
``cli_checks.run_module`` does; the lock and kill checks as real processes) and asserts exit status 2, one line
naming the file, no traceback, and every file in the folder byte-identical afterwards (inputs untouched, nothing
partial written)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from cli_checks import REPO, assert_one_line, run_module  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SYNTH = ["scout_data", "synth", "--quiet", "--image-size", "64"]


def command(*argv: str | Path) -> list[str]:
    return [sys.executable, "-m", *map(str, argv)]


def run(cwd: Path, *argv: str | Path) -> subprocess.CompletedProcess[str]:
    return run_module(argv, cwd=cwd)


def start(cwd: Path, *argv: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=cwd)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(cwd: Path, *argv: str | Path, names: tuple[str, ...] = ()) -> str:
    """Run a command that must be refused; nothing under ``cwd`` may change."""
    before = snapshot(cwd)
    line = assert_one_line(run(cwd, *argv), *names)
    assert snapshot(cwd) == before, "a refused command changed or left files"
    return line


def wait_for_lock(lock: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until ``proc`` holds ``lock`` (the file names its pid), then stop it there (SIGSTOP)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if lock.is_file() and f"pid {proc.pid}:" in lock.read_text(errors="replace"):
            proc.send_signal(signal.SIGSTOP)
            return
        assert proc.poll() is None, f"ended before it was seen holding {lock}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.005)
    raise AssertionError(f"{lock} never held by pid {proc.pid}")


# --- 1. one writer per output --------------------------------------------------------------------------------


def test_a_second_synth_into_a_folder_being_written_is_refused(tmp_path: Path) -> None:
    """Two `synth --out D` at once with other seeds used to both exit 0 with D/train.json mixing their records."""
    first = start(tmp_path, *SYNTH, "--out", "D", "--num", "400", "--seed", "0")
    try:
        wait_for_lock(tmp_path / ".D.lock", first)
        line = refused(tmp_path, *SYNTH, "--out", "D", "--num", "400", "--seed", "1",
                       names=("--out D is being written by another run", f"pid {first.pid}"))
        assert "--seed 0" in line  # the holder's command
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    records = json.loads((tmp_path / "D" / "train.json").read_text())
    assert records and {r["source_ids"]["seed"] for r in records} == {0}
    assert not (tmp_path / ".D.lock").exists()  # released and removed at the end


def test_a_second_model_grounding_into_an_answers_file_being_written_is_refused(
        tiny_llava: Path, tmp_path: Path) -> None:
    """Two runs into one answers file (routes frozen and grounding) used to both exit 0 with mixed lines."""
    Image.new("RGB", (48, 40), (100, 140, 180)).save(tmp_path / "0.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": "0.png", "text": "Where is it?"}) + "\n"
                                 for i in range(40)))
    args = ["llava_twist.eval.model_grounding", "--model-path", tiny_llava, "--question-file", "q.jsonl",
            "--image-folder", ".", "--answers-file", "a.jsonl", "--device", "cpu", "--max-new-tokens", "4"]
    first = start(tmp_path, *args, "--route", "frozen")
    try:
        wait_for_lock(tmp_path / ".a.jsonl.lock", first)
        refused(tmp_path, *args, "--route", "grounding",
                names=("--answers-file a.jsonl is being written by another run", f"pid {first.pid}"))
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(answers) == 40 and {a["metadata"]["settings"]["route"] for a in answers} == {"frozen"}


# --- 2. a killed run's temporaries --------------------------------------------------------------------------


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_sigkill_then_resume_is_byte_identical_and_leaves_no_temporaries(tmp_path: Path) -> None:
    """SIGKILL of synth used to leave images/train/*.png.tmp<pid> that --resume never removed."""
    args = ["scout_data", "synth", "--quiet", "--num", "150", "--seed", "3", "--image-size", "256"]
    assert run(tmp_path, *args, "--out", "ref").returncode == 0
    killed = None
    for _ in range(5):  # kill it while an image is half written (a temporary on disk)
        proc = start(tmp_path, *args, "--out", "D")
        while proc.poll() is None:  # an image's temporary: the run's own record (.scout-run.json) is written by then
            if temporaries(tmp_path / "D" / "images"):
                proc.send_signal(signal.SIGSTOP)
                if temporaries(tmp_path / "D" / "images"):
                    proc.kill()
                    proc.wait()
                    killed = temporaries(tmp_path / "D")
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.001)
        if killed:
            break
        proc.wait()
        for p in sorted((tmp_path / "D").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    assert killed, "never caught a temporary on disk"
    assert (tmp_path / ".D.lock").exists()  # the killed run's lock file: free, taken over below
    done = run(tmp_path, *args, "--out", "D", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = snapshot(tmp_path / "D"), snapshot(tmp_path / "ref")
    got.pop("summary.json"), want.pop("summary.json")  # timings and counts of this run
    assert sorted(got) == sorted(want)  # no stray temporary, nothing missing
    assert got == want
    assert not temporaries(tmp_path) and not (tmp_path / ".D.lock").exists()


def test_only_dead_writers_temporaries_of_its_own_output_are_removed(tmp_path: Path) -> None:
    from scout_data.output import remove_stale_temporaries

    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [out / "images" / f".a.png.tmp{dead}", out / "images" / f"b.png.tmp{dead}", tmp_path / f".out.tmp{dead}"]
    kept = [out / "images" / f".c.png.tmp{os.getppid()}",  # a live writer's
            out / "images" / "notes.tmp", out / "images" / "d.png", tmp_path / f".other.tmp{dead}"]
    for p in stale + kept:
        p.write_text("x")
    assert sorted(remove_stale_temporaries(out, tree=True)) == sorted(map(str, stale))
    assert all(p.exists() for p in kept)


@pytest.mark.parametrize("resume", [False, True], ids=["run again", "resume"])
def test_a_run_killed_while_writing_its_run_file_can_be_run_again_or_resumed(tmp_path: Path, resume: bool) -> None:
    """Killed before its run file was whole, synth left only that file's temporary: the folder was neither
    resumable ("did not make it") nor reusable ("not empty")."""
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / f"..scout-run.json.tmp{2**22 + 12345}").write_text("{")  # its writer is gone
    proc = run(tmp_path, *SYNTH, "--out", "D", "--num", "2", *(["--resume"] if resume else []))
    assert proc.returncode == 0, proc.stderr
    assert not temporaries(tmp_path / "D") and (tmp_path / "D" / "train.json").is_file()


# --- 3. bounded work -----------------------------------------------------------------------------------------


@pytest.fixture()
def scout_json(tmp_path: Path) -> Path:
    assert run(tmp_path, *SYNTH, "--out", "s", "--num", "4").returncode == 0
    return tmp_path / "s" / "train.json"


@pytest.mark.parametrize("argv, names", [
    (["mix", "--ratio", "1e9"], ("--ratio", "[0, 100]")),
    (["mix", "--replay-fraction", "0.9999999"], ("--replay-fraction", "[0, 0.99]")),
    (["mix", "--ratio", "nan"], ("--ratio",)),
], ids=["ratio 1e9", "replay fraction 0.9999999", "ratio nan"])
def test_mix_amounts_are_bounded(tmp_path: Path, scout_json: Path, argv: list[str], names: tuple[str, ...]) -> None:
    refused(tmp_path, "scout_data", argv[0], "--scout", scout_json, "--replay", scout_json, "--out", "m.json",
            *argv[1:], names=names)


def test_mix_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from scout_data import mix

    monkeypatch.setattr(mix, "MAX_MIX_RECORDS", 10)
    with pytest.raises(ValueError, match="the limit is 10"):
        mix.replay_count(4, ratio=2)


@pytest.mark.parametrize("argv, names", [
    (["--image-size", "100000"], ("--image-size 100000", "4096")),
    (["--image-size", "64x100000"], ("--image-size 64x100000",)),
    (["--num", "1e12"], ("--num",)),
    (["--workers", "0"], ("--workers",)),
    (["--max-objects", "100000"], ("--max-objects",)),
    (["--aspect-range", "0.001,1000", "--random-aspect"], ("--aspect-range",)),
    (["--kinds", "refexp:inf"], ("refexp",)),
    (["--shard-size", "0"], ("--shard-size",)),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_synth_sizes_and_counts_are_bounded(tmp_path: Path, argv: list[str], names: tuple[str, ...]) -> None:
    refused(tmp_path, "scout_data", "synth", "--out", "D", "--quiet", *argv, names=names)


def test_validate_refuses_a_negative_report_count(tmp_path: Path, scout_json: Path) -> None:
    refused(tmp_path, "scout_data", "validate", scout_json, "--max-report", "-1", names=("--max-report",))


def scout_parsers() -> list[tuple[str, object]]:
    from scout_data.cli import SOURCE_COMMANDS, build_parser

    found = []
    for cmd in [*SOURCE_COMMANDS, "mix", "validate", "stats", "preview"]:
        parser, _ = build_parser([cmd])
        sub = next(a for a in parser._actions if a.choices and cmd in a.choices).choices[cmd]
        found += [(f"{cmd} {'/'.join(a.option_strings)}", a) for a in sub._actions]
    return found


def eval_parsers() -> list[tuple[str, object]]:
    """The actions of the commands that answer and score (their counts and sizes are bounded too)."""
    from llava_twist.eval import model_grounding, scout_questions
    from llava_twist.serve import cli

    return [(f"{m.__name__} {'/'.join(a.option_strings)}", a)
            for m in (model_grounding, scout_questions, cli) for a in m.build_parser()._actions]


def test_every_number_a_scout_data_command_takes_has_a_stated_limit() -> None:
    from scout_data.limits import Bounded

    unbounded = {"--seed", "--index"}  # any integer is a seed; an index is checked against the file
    for name, action in [*scout_parsers(), *eval_parsers()]:
        if action.type in (int, float) and not set(action.option_strings) & unbounded:
            pytest.fail(f"{name} takes a number without a limit")
        if isinstance(action.type, Bounded):
            assert str(action.type) in (action.help or ""), f"{name}: its --help does not state {action.type}"


def test_summary_does_not_follow_symlink_cycles(tmp_path: Path) -> None:
    """A link to itself listed one result 41 times; a link to its parent ran past 90 s."""
    results = tmp_path / "results"
    (results / "a").mkdir(parents=True)
    (results / "a" / "x.result.json").write_text(json.dumps({"benchmark": "refexp", "n": 3, "name": "x",
                                                             "metrics": {"acc@0.5": 0.5}}))
    (results / "a" / "self").symlink_to(".")
    (results / "a" / "up").symlink_to("..")
    (results / "twin.json").symlink_to("a/x.result.json")  # the same file by another name
    proc = run(tmp_path, "llava_twist.eval.summary", "results")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in (results / "summary.md").read_text().splitlines() if line.startswith("| x |")]
    assert len(rows) == 1 and "1 results" in proc.stdout


# --- 4. minor ------------------------------------------------------------------------------------------------


def test_preview_writes_the_format_its_suffix_names(tmp_path: Path, scout_json: Path) -> None:
    args = ["scout_data", "preview", scout_json, "--image-folder", tmp_path / "s" / "images"]
    assert run(tmp_path, *args, "--out", "p.jpg").returncode == 0
    assert (tmp_path / "p.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes
    assert run(tmp_path, *args, "--out", "p.png").returncode == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused(tmp_path, *args, "--out", "p.txt", names=("--out p.txt", ".png, .jpg"))


def test_validate_names_record_and_field_of_a_bad_frame_or_size(tmp_path: Path, scout_json: Path) -> None:
    records = json.loads(scout_json.read_text())
    records[1]["box_frame"] = "weird"
    records[2]["image_size"] = "336x336"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    proc = run(tmp_path, "scout_data", "validate", bad)
    assert proc.returncode == 1, proc.stderr
    assert f"bad.json:1 id={records[1]['id']} box_frame 'weird'" in proc.stdout
    assert f"bad.json:2 id={records[2]['id']} image_size '336x336'" in proc.stdout
    assert "2 bad" in proc.stderr


def test_summary_rows_survive_pipes_and_newlines_in_names(tmp_path: Path) -> None:
    from llava_twist.eval.summary import markdown_table

    table = markdown_table([{"benchmark": "refexp", "n": 2, "name": "a|b\nc", "path": "x", "metrics": {"m": 1}}])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[2] == "| a\\|b c | refexp |  | 2 | 1 |"


# --- 5. the scorers' input schema ----------------------------------------------------------------------------


def question(qid: object, **extra: object) -> dict[str, object]:
    return {"question_id": qid, "image": "0.png", "text": "Where?", "width": 100, "height": 80,
            "box_frame": "original", "bbox_xyxy_px": [10, 10, 50, 50], **extra}


def answer(qid: object, text: str = "Answer: [0.10, 0.12, 0.50, 0.62]") -> dict[str, object]:
    return {"question_id": qid, "text": text}


def jsonl(rows: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD_Q = jsonl([question(1), question(2)])
GOOD_A = jsonl([answer(1), answer(2)])
SCHEMA = {  # name: (question file bytes, answers file bytes, the file named, what the line says)
    "question ids 1 and '1'": (jsonl([question(1), question("1")]), GOOD_A, "q.jsonl:2", "mixed types"),
    "two questions share an id": (jsonl([question(1), question(1)]), GOOD_A, "q.jsonl:2", "repeats line 1"),
    "an answer line repeated": (GOOD_Q, jsonl([answer(1), answer(2), answer(1, "no")]), "a.jsonl:3", "repeats"),
    "answer ids of mixed types": (GOOD_Q, jsonl([answer(1), answer("2")]), "a.jsonl:2", "mixed types"),
    "a question without an id": (jsonl([question(1), {"text": "?"}]), GOOD_A, "q.jsonl:2", "no 'question_id'"),
    "a non-UTF-8 question file": (GOOD_Q + b'{"question_id": 3, "text": "caf\xe9"}\n', GOOD_A, "q.jsonl:3",
                                  "not UTF-8"),
    "a non-UTF-8 answers file": (GOOD_Q, GOOD_A.replace(b"Answer", b"Ans\xffwer", 1), "a.jsonl:1", "not UTF-8"),
    "a box of strings": (jsonl([question(1, bbox_xyxy_px=["1", "2", "3", "4"])]), GOOD_A, "q.jsonl:1",
                         "'bbox_xyxy_px' must be"),
    "a box of nulls": (jsonl([question(1, bbox_xyxy_px=[None] * 4)]), GOOD_A, "q.jsonl:1", "'bbox_xyxy_px'"),
    "a box list with a null": (jsonl([question(1, gt_boxes_xyxy_px=[[1, 2, 3, 4], None])]), GOOD_A, "q.jsonl:1",
                               "'gt_boxes_xyxy_px[1]'"),
    "a phrase box of strings": (jsonl([question(1, phrases=[{"phrase": "a", "boxes_xyxy_px": [["a"] * 4]}])]),
                                GOOD_A, "q.jsonl:1", "'phrases[0].boxes_xyxy_px[0]'"),
    "a question whose text is a number": (jsonl([question(1, text=5)]), GOOD_A, "q.jsonl:1", "'text'"),
}
SCORERS = ["eval_refexp", "eval_localization", "eval_grounded_caption"]


@pytest.mark.parametrize("case", SCHEMA)
def test_refexp_scorer_refuses_ambiguous_or_malformed_inputs(tmp_path: Path, case: str) -> None:
    questions, answers, where, what = SCHEMA[case]
    (tmp_path / "q.jsonl").write_bytes(questions)
    (tmp_path / "a.jsonl").write_bytes(answers)
    refused(tmp_path, "llava_twist.eval.eval_refexp", "--question-file", "q.jsonl", "--answers-file", "a.jsonl",
            names=(where, what))


@pytest.mark.parametrize("scorer", [*SCORERS, "eval_retention", "model_grounding"])
def test_every_reader_of_question_files_refuses_duplicates_and_bad_bytes(tmp_path: Path, scorer: str) -> None:
    (tmp_path / "a.jsonl").write_bytes(GOOD_A)
    args = {"eval_retention": ["--base-answers", "a.jsonl", "--twist-answers", "a.jsonl"],
            "model_grounding": ["--model-path", "no-model", "--image-folder", ".", "--answers-file", "out.jsonl"],
            }.get(scorer, ["--answers-file", "a.jsonl"])
    for name in ("two questions share an id", "a non-UTF-8 question file"):
        questions, _, where, what = SCHEMA[name]
        (tmp_path / "q.jsonl").write_bytes(questions)
        refused(tmp_path, f"llava_twist.eval.{scorer}", "--question-file", "q.jsonl", *args, names=(where, what))
    if scorer != "model_grounding":
        (tmp_path / "q.jsonl").write_bytes(GOOD_Q)
        (tmp_path / "a.jsonl").write_bytes(SCHEMA["an answer line repeated"][1])
        refused(tmp_path, f"llava_twist.eval.{scorer}", "--question-file", "q.jsonl", *args,
                names=("a.jsonl:3", "repeats"))


def test_a_failed_folder_replacement_keeps_the_old_folder(tmp_path: Path) -> None:
    """``replace_folder``: a write that fails leaves the old folder as it was, and an old folder a killed run set
    aside (its target gone) is put back by the next run before anything else."""
    from scout_data.output import replace_folder

    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")

    def failing(tmp: str) -> None:
        Path(tmp).mkdir()
        (Path(tmp) / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_folder(target, failing)
    assert (target / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target.rename(tmp_path / f".model.old.tmp{int(dead.stdout)}")  # killed between its two renames
    with pytest.raises(OSError):
        replace_folder(target, failing)
    assert (target / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

"""Property-based sweep: malformed records of every input format, fed to every reader of that format.

Each reader runs as its command line does (``cli_checks.run_module``, in process). Whatever the damage, it either
accepts the file (exit 0) or refuses it with exit 2 and one line naming the file; it never raises, every input
stays byte-identical, and a refused run leaves no output behind."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_twist.train.records import BadRecordError, validated_records
from scout_data import cli as scout_cli

sys.path.insert(0, str(Path(__file__).parent))
from cli_checks import run_module  # noqa: E402

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-5, 5), max_size=5), st.lists(st.text(max_size=2), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just([[0.1, 0.2, 0.3, 0.4]]),
    st.just([1e308, -1e308, 0, 0]), st.just("..\u0000/"),
)


# ---------------------------------------------------------------- damage


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place inside a JSON value (dict keys and list indices), the value itself first."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += paths(v, (*prefix, i))
    return found


def damaged(value: Any, where: tuple, action: str, junk: Any) -> Any:
    """``value`` with the place ``where`` replaced by ``junk``, or deleted (``action == "delete"``)."""
    if not where:
        return junk
    value = json.loads(json.dumps(value))
    parent = value
    for key in where[:-1]:
        parent = parent[key]
    if action == "delete" and isinstance(parent, dict | list):
        del parent[where[-1]]
    else:
        parent[where[-1]] = junk
    return value


class Damage:
    """One way to damage a file of records, shown in a failure as what it does."""

    def __init__(self, what: str, make: Callable[[str], bytes]) -> None:
        self.what, self.make = what, make

    def __call__(self, fmt: str) -> bytes:
        return self.make(fmt)

    def __repr__(self) -> str:
        return f"Damage({self.what})"


@st.composite
def damage(draw: st.DrawFn, records: list[dict[str, Any]]) -> Damage:
    """A way to damage a file of ``records``: one record's field replaced or deleted, a duplicated record, or
    bytes no JSON reader can take (invalid UTF-8, cut short, another top-level type)."""
    kind = draw(st.sampled_from(["field", "field", "field", "duplicate", "bytes"]))
    index = draw(st.integers(0, len(records) - 1))
    if kind == "field":
        where = draw(st.sampled_from(paths(records[index])[1:]))
        action = draw(st.sampled_from(["replace", "delete"]))
        junk = draw(JUNK)
        changed = [damaged(r, where, action, junk) if i == index else r for i, r in enumerate(records)]
        shown = f"record {index} {list(where)}: " + ("deleted" if action == "delete" else f"= {junk!r}")
        return Damage(shown, lambda fmt: encode(changed, fmt))
    if kind == "duplicate":
        return Damage(f"record {index} twice", lambda fmt: encode([*records, records[index]], fmt))
    how = draw(st.sampled_from(["utf8", "cut", "top"]))
    top = draw(st.sampled_from([[1, 2, 3], {"a": 1}, "text", 5, None, [[]]]))
    cut = draw(st.floats(0.05, 0.95))

    def corrupt(fmt: str) -> bytes:
        good = encode(records, fmt)
        if how == "utf8":
            return good[: len(good) // 2] + b"\xff\xfe" + good[len(good) // 2:]
        if how == "cut":
            return good[: int(len(good) * cut)]
        return (json.dumps(top) + "\n").encode()

    return Damage({"utf8": "invalid UTF-8", "cut": f"cut at {cut:.2f}", "top": f"the whole file {top!r}"}[how], corrupt)


def encode(records: list[Any], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    return json.dumps(records, indent=1).encode()


# ---------------------------------------------------------------- running a reader


def run_cli(module: str, argv: list[str]) -> tuple[int, str]:
    """``python -m module argv`` as ``cli_checks.run_module`` runs it: the exit status and stderr."""
    proc = run_module([module, *argv])
    return proc.returncode, proc.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_refusal(status: int, err: str, named: Path, before: dict[str, bytes], folder: Path,
                  outputs: list[Path]) -> None:
    """Accepted (0), or refused (2) with one line naming ``named``; the inputs unchanged; no output when refused;
    never a traceback (``validate``'s own exit 1 is its verdict, an uncaught exception's is not)."""
    assert "Traceback" not in err, err[-3000:]
    after = {k: v for k, v in snapshot(folder).items() if k in before}
    assert after == before, "an input changed"
    assert status in (0, 2), (status, err)
    if status == 2:
        lines = [line for line in err.strip().splitlines() if "%|" not in line and "it/s]" not in line]
        assert len(lines) == 1 and named.name in lines[0], err
        assert not [p for p in outputs if p.exists()], "a refused run left output"


# ---------------------------------------------------------------- the valid inputs the damage starts from


@pytest.fixture(scope="module")
def scout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small SCOUT set (every kind) and the question files made from it."""
    root = tmp_path_factory.mktemp("scout")
    assert scout_cli.main(["synth", "--out", str(root / "d"), "--num", "8", "--splits", "test:1", "--image-size",
                           "64", "--quiet"]) == 0
    from llava_twist.eval import scout_questions

    assert scout_questions.main(["--scout-json", str(root / "d" / "test.json"), "--out-dir", str(root / "q")]) == 0
    records = json.loads((root / "d" / "test.json").read_text())
    refexp = [json.loads(line) for line in (root / "q" / "refexp.jsonl").read_text().splitlines()]
    local = [json.loads(line) for line in (root / "q" / "localization.jsonl").read_text().splitlines()]
    return {"images": root / "d" / "images", "records": records, "refexp": refexp, "localization": local}


def answers_for(questions: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [{"question_id": q["question_id"], "prompt": q["text"], "text": text, "answer_id": str(i),
             "model_id": "m", "metadata": {}} for i, q in enumerate(questions)]


ANSWER_TEXT = "Step 1: the object [0.10, 0.10, 0.30, 0.30].\nAnswer: [0.10, 0.10, 0.30, 0.30]"


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="malformed-"))


# ---------------------------------------------------------------- LLaVA / SCOUT conversation JSON


@SETTINGS
@given(data=st.data())
def test_scout_json_readers_refuse_damage_in_one_line(scout: dict[str, Any], data: st.DataObject) -> None:
    corrupt = data.draw(damage(scout["records"]))
    command = data.draw(st.sampled_from(["validate", "stats", "preview", "mix"]))
    work = workdir()
    try:
        bad = work / "train.json"
        bad.write_bytes(corrupt("json"))
        replay = work / "replay.json"
        replay.write_bytes(encode(scout["records"], "json"))
        out = work / "out"
        argv = {
            "validate": ["validate", str(bad), "--image-folder", str(scout["images"])],
            "stats": ["stats", str(bad)],
            "preview": ["preview", str(bad), "--image-folder", str(scout["images"]), "--index", "0", "--out",
                        str(out / "p.png")],
            "mix": ["mix", "--scout", str(bad), "--replay", str(replay), "--out", str(out / "mix.json"),
                    "--ratio", "1"],
        }[command]
        before = snapshot(work)
        status, err = run_cli("scout_data", argv)
        if command == "validate" and status == 1:  # validate's own verdict: bad records, reported per record
            status = 0
        check_refusal(status, err, bad, before, work, [out / "p.png", out / "mix.json"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


@SETTINGS
@given(data=st.data())
def test_the_training_reader_refuses_damage_naming_file_and_record(scout: dict[str, Any], data: st.DataObject) -> None:
    """What ``train_twist`` reads before a step runs: a damaged file is one ``BadRecordError`` (the trainer prints
    it as one line and exits 2), never another exception."""
    corrupt = data.draw(damage(scout["records"]))
    work = workdir()
    try:
        bad = work / "train.json"
        bad.write_bytes(corrupt("json"))
        before = snapshot(work)
        try:
            validated_records(bad, str(scout["images"]))
        except BadRecordError as exc:
            assert str(bad) in str(exc) and "\n" not in str(exc)
        assert snapshot(work) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- question and answer JSONL (the scorers)


SCORERS = {
    "refexp": ("llava_twist.eval.eval_refexp", "refexp"),
    "localization": ("llava_twist.eval.eval_localization", "localization"),
}


@SETTINGS
@given(data=st.data())
def test_scorers_refuse_damaged_question_and_answer_files_in_one_line(scout: dict[str, Any],
                                                                      data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(SCORERS)))
    module, key = SCORERS[name]
    questions = scout[key]
    answers = answers_for(questions, ANSWER_TEXT)
    which = data.draw(st.sampled_from(["questions", "answers"]))
    corrupt = data.draw(damage(questions if which == "questions" else answers))
    work = workdir()
    try:
        qfile, afile, result = work / "q.jsonl", work / "a.jsonl", work / "r.json"
        qfile.write_bytes(corrupt("jsonl") if which == "questions" else encode(questions, "jsonl"))
        afile.write_bytes(corrupt("jsonl") if which == "answers" else encode(answers, "jsonl"))
        before = snapshot(work)
        status, err = run_cli(module, ["--question-file", str(qfile), "--answers-file", str(afile),
                                     "--result-file", str(result)])
        check_refusal(status, err, qfile if which == "questions" else afile, before, work, [result])
    finally:
        shutil.rmtree(work, ignore_errors=True)


@SETTINGS
@given(data=st.data())
def test_retention_refuses_damaged_files_in_one_line(data: st.DataObject) -> None:
    questions = [{"question_id": f"u{i}", "image": "a.png", "text": "What colour is the circle?", "answer": "red",
                  "task": "understanding"} for i in range(4)]
    answers = [{"question_id": q["question_id"], "text": "red", "metadata": {"route": "frozen"}} for q in questions]
    which = data.draw(st.sampled_from(["questions", "base", "twist"]))
    corrupt = data.draw(damage(questions if which == "questions" else answers))
    work = workdir()
    try:
        files = {"questions": work / "q.jsonl", "base": work / "base.jsonl", "twist": work / "twist.jsonl"}
        for role, path in files.items():
            path.write_bytes(corrupt("jsonl") if role == which else encode(
                questions if role == "questions" else answers, "jsonl"))
        result = work / "r.json"
        before = snapshot(work)
        status, err = run_cli("llava_twist.eval.eval_retention", [
            "--question-file", str(files["questions"]), "--base-answers", str(files["base"]),
            "--twist-answers", str(files["twist"]), "--result-file", str(result)])
        check_refusal(status, err, files[which], before, work, [result])
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- result JSON (the summary)


@SETTINGS
@given(data=st.data())
def test_summary_refuses_or_skips_damaged_results_in_one_line(data: st.DataObject) -> None:
    good = {"benchmark": "refexp", "name": "m", "n": 2, "protocol": "ours", "headline": ["acc@0.5"],
            "metrics": {"acc@0.5": 0.5, "mean_iou": 0.4}, "question_file": "/q.jsonl", "answers_file": "/a.jsonl"}
    corrupt = data.draw(damage([good]))
    work = workdir()
    try:
        (work / "results").mkdir()
        bad = work / "results" / "a.result.json"
        raw = corrupt("json")
        bad.write_bytes(raw[raw.index(b"{"):raw.rindex(b"}") + 1] if raw.count(b"{") and raw.count(b"}") else raw)
        before = snapshot(work)
        status, err = run_cli("llava_twist.eval.summary",
                              [str(work / "results"), "--out", str(work / "out" / "summary")])
        check_refusal(status, err, bad, before, work, [work / "out" / "summary.md"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

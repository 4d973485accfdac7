"""The bad-input sweep as a table: each probe gives a command a bad input and checks that it stops with a
one-line error (exit status 2) naming the problem, and that every file the user had is left as it was.
A new probe is one line in PROBES (and, if it needs files, a few in ``make_files``)."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from cli_checks import REPO, assert_one_line, run_module, run_process  # noqa: E402


@dataclass(frozen=True)
class Probe:
    name: str
    argv: str  # `python -m` module and arguments; {name} is a file made by make_files
    message: str  # a piece of the one-line error
    untouched: tuple[str, ...] = ()  # files that must keep their bytes


TRAIN = ("llava_twist.train.train_twist --model_name_or_path {model} --image_folder {images} --version v1 "
         "--mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False "
         "--mm_use_im_patch_token False --image_aspect_ratio pad --report_to none --max_steps 1")
PROBES = [
    Probe("answers file is someone's notes", "llava_twist.eval.model_grounding --model-path {model} --question-file "
          "{questions} --image-folder {images} --answers-file {notes} --device cpu", "is not an answer this command",
          ("notes",)),
    Probe("synth resumes into a folder it did not make", "scout_data synth --out {user_dir} --num 4 --resume --quiet",
          "did not make it", ("user_json",)),
    Probe("synth resumes another seed's run", "scout_data synth --out {synth_dir} --num 4 --seed 1 --resume --quiet",
          "seed was 0, now 1", ("synth_train",)),
    Probe("tiny writes over a checkpoint", "llava_twist.tiny --out {model}", "pass --overwrite", ("model_config",)),
    Probe("tiny writes over a file", "llava_twist.tiny --out {notes}", "pass --overwrite", ("notes",)),
    Probe("training writes into its base", TRAIN + " --output_dir {model} --data_path {train_json}",
          "is one of this command's inputs", ("model_config", "model_weights")),
    Probe("preview over its data file", "scout_data preview {synth_train} --image-folder {synth_dir} --out "
          "{synth_train}", "inputs are never overwritten", ("synth_train",)),
    Probe("cli saves over its image", "llava_twist.serve.cli --model-path {model} --image-file {image} --query q "
          "--save-image {image} --device cpu", "inputs are never overwritten", ("image",)),
    Probe("delta without a config fingerprint on another base", "llava_twist.serve.cli --model-path {delta_bare} "
          "--model-base {other_model} --image-file {image} --query q --device cpu", "trained on another base"),
    Probe("delta full of NaN", "llava_twist.serve.cli --model-path {delta_nan} --model-base {model} --image-file "
          "{image} --query q --device cpu", "non-finite weights"),
    Probe("a query past the model's context", "llava_twist.serve.cli --model-path {model} --image-file {image} "
          "--query {long_query} --device cpu", "the model's context is"),
    Probe("hub id not in the cache", "llava_twist.serve.cli --model-path no-such-org/no-such-model --image-file "
          "{image} --query q --device cpu", "hub id could not be resolved"),
    Probe("training on a degenerate box", TRAIN + " --output_dir {out} --data_path {bad_box_json}", "degenerate box"),
    Probe("training on an image outside its folder", TRAIN + " --output_dir {out} --data_path {escape_json}",
          "leaves the image folder"),
    Probe("a question whose image is outside its folder", "llava_twist.eval.model_grounding --model-path {model} "
          "--question-file {escape_questions} --image-folder {images} --answers-file {out}/a.jsonl --device cpu",
          "leaves the image folder"),
    Probe("training on a PNG as data", TRAIN + " --output_dir {out} --data_path {image}", "not a UTF-8 JSON file"),
    Probe("a 1x1 image", "llava_twist.serve.cli --model-path {model} --image-file {tiny_image} --query q --device cpu",
          "both sides must be at least"),
    Probe("a PNG header claiming 20000x20000", "llava_twist.serve.cli --model-path {model} --image-file {bomb} "
          "--query q --device cpu", "cannot be read as an image"),
    Probe("no beams", "llava_twist.serve.cli --model-path {model} --image-file {image} --query q --num_beams 0 "
          "--device cpu", "argument --num_beams: 0: must be an integer in [1, 32]"),
    Probe("4-bit without bitsandbytes or a GPU", "llava_twist.serve.cli --model-path {model} --image-file {image} "
          "--query q --load-4bit --device cpu", "need a CUDA GPU and the bitsandbytes package"),
    Probe("converter images folder that is not there", "scout_data refcoco --refs {notes} --instances {notes} "
          "--images {out}/typo --out {out}/refcoco", "--images {out}/typo: no such folder"),
    Probe("JSON nested too deeply", "scout_data validate {deep_json} --image-folder {images}", "nested too deeply"),
    Probe("mix with an infinite ratio", "scout_data mix --scout {synth_train} --replay {synth_train} --out "
          "{out}/m.json --ratio inf", "must be a finite number"),
    # the output guard (scout_data.output.check_output) in the eval commands
    Probe("answers file is the question file", "llava_twist.eval.model_grounding --model-path {model} "
          "--question-file {questions} --image-folder {images} --answers-file {questions} --overwrite --device cpu",
          "is one of this command's inputs", ("questions",)),
    Probe("answers file inside the model folder", "llava_twist.eval.model_grounding --model-path {model} "
          "--question-file {questions} --image-folder {images} --answers-file {model}/answers.jsonl --device cpu",
          "which this command reads", ("model_config",)),
    Probe("temperature not a number", "llava_twist.eval.model_grounding --model-path {model} --question-file "
          "{questions} --image-folder {images} --answers-file {out}/nan.jsonl --temperature nan --device cpu",
          "argument --temperature: nan: must be a finite number in [0, 100]"),
    Probe("scorer's result file is its question file", "llava_twist.eval.eval_refexp --question-file {questions} "
          "--answers-file {answers} --result-file {questions}", "is one of this command's inputs", ("questions",)),
    Probe("scorer's result file is someone's notes", "llava_twist.eval.eval_refexp --question-file {questions} "
          "--answers-file {answers} --result-file {notes}", "did not make it", ("notes",)),
    Probe("retention result file is the base's answers", "llava_twist.eval.eval_retention --question-file "
          "{questions} --base-answers {answers} --twist-answers {answers} --result-file {answers}",
          "is one of this command's inputs", ("answers",)),
    Probe("question files over the user's", "llava_twist.eval.scout_questions --scout-json {synth_train} "
          "--out-dir {user_questions}", "did not make it", ("user_question_file",)),
    Probe("training images that are 0-byte PNGs", TRAIN + " --output_dir {out} --data_path {zero_png_json} "
          "--image_folder {zero_png_dir}", "image does not open", ("zero_png_json",)),
    Probe("a checkpoint of another base in --output_dir", TRAIN + " --output_dir {other_run} --data_path "
          "{train_json}", "was trained on another base", ("other_run_config",)),
    Probe("a negative top_p", "llava_twist.serve.cli --model-path {model} --image-file {image} --query q --top_p -3 "
          "--device cpu", "argument --top_p: -3: must be a finite number in [0, 1]"),
    Probe("training into its base's vision tower", TRAIN + " --output_dir {model}/clip-vision-tower "
          "--data_path {train_json}", "which this command reads", ("model_config", "model_weights")),
    Probe("mix of a JSON list of numbers", "scout_data mix --scout {numbers_json} --replay {synth_train} --out "
          "{out}/mix.json --ratio 1", "record 0 (id None): record is a int", ("numbers_json", "synth_train")),
    Probe("summary over the user's summary.md", "llava_twist.eval.summary {user_summary}", "did not make it",
          ("user_summary_md",)),
    # the fourth sweep (issue 48)
    Probe("validate /dev/zero", "scout_data validate /dev/zero", "/dev/zero: is a character device; expected a "
          "regular file"),
    Probe("stats of a FIFO", "scout_data stats {fifo}", "is a pipe (FIFO); expected a regular file"),
    Probe("validate a file over the size limit", "scout_data validate {huge_json}", "the limit is 4096 MiB"),
    Probe("preview of a decompression bomb", "scout_data preview {bomb_record_json} --image-folder {root} --out "
          "{out}/bomb.png", "cannot be read as an image", ("bomb_record_json",)),
    Probe("tiny --hidden-size 0", "llava_twist.tiny --out {out}/t0 --hidden-size 0",
          "argument --hidden-size: 0: must be an integer in [8, 1024]"),
    Probe("tiny --max-position-embeddings 0", "llava_twist.tiny --out {out}/t1 --max-position-embeddings 0",
          "argument --max-position-embeddings: 0: must be an integer in [128, 8192]"),
    Probe("tiny --num-hidden-layers -3", "llava_twist.tiny --out {out}/t2 --num-hidden-layers -3",
          "argument --num-hidden-layers: -3: must be an integer in [1, 16]"),
    Probe("tiny --num-attention-heads 3", "llava_twist.tiny --out {out}/t3 --num-attention-heads 3",
          "--hidden-size 64 must be a multiple of --num-attention-heads 3"),
    Probe("tiny --vocab-size 5", "llava_twist.tiny --out {out}/t4 --vocab-size 5",
          "argument --vocab-size: 5: must be an integer in [512, 32000]"),
    Probe("tiny --hidden-size 200000", "llava_twist.tiny --out {out}/t5 --hidden-size 200000",
          "argument --hidden-size: 200000: must be an integer in [8, 1024]"),
    Probe("synth --min-objects that cannot fit", "scout_data synth --out {out}/crowded --num 4 --image-size 32 "
          "--min-objects 64 --max-objects 64", "--min-objects 64: that many objects do not fit a 32x32 image"),
    Probe("RefCOCO refs sharing one long sentence", "scout_data refcoco --refs {shared_refs} --instances {notes} "
          "--images {images} --out {out}/refcoco", "more than its", ("shared_refs",)),
    Probe("a question image that is /dev/zero", "llava_twist.serve.cli --model-path {model} --image-file /dev/zero "
          "--query q --device cpu", "/dev/zero: is a character device"),
    Probe("training data that is a folder", TRAIN + " --output_dir {out}/tr --data_path {images}",
          "is a folder; expected a regular file"),
]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression-bomb probe), with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def grounding_record(image: str, box: str) -> dict:
    return {"id": "g0", "image": image, "task": "grounding", "conversations": [
        {"from": "human", "value": "<image>\nWhere is the red circle? Answer step by step."},
        {"from": "gpt", "value": f"Step 1: The red circle {box}.\nAnswer: {box}"}]}


@pytest.fixture(scope="module")
def files(tiny_llava: Path, other_tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from llava_twist.model.builder import convert_llava_to_twist, save_twist_delta

    root = tmp_path_factory.mktemp("bad-inputs")
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), (120, 120, 120)).save(images / "0.png")
    f = {"model": tiny_llava, "other_model": other_tiny_llava, "images": images, "image": images / "0.png",
         "model_config": tiny_llava / "config.json", "model_weights": tiny_llava / "model.safetensors",
         "out": root / "out", "long_query": "red," * 5000}
    (root / "q.jsonl").write_text(json.dumps({"question_id": "q0", "image": "0.png", "text": "Where?"}) + "\n")
    f["questions"] = root / "q.jsonl"
    f["escape_questions"] = root / "escape.jsonl"
    f["escape_questions"].write_text(json.dumps({"question_id": "e", "image": "../images/0.png", "text": "?"}) + "\n")
    Image.new("RGB", (1, 1)).save(root / "one.png")
    f["tiny_image"] = root / "one.png"
    f["bomb"] = root / "bomb.png"
    f["bomb"].write_bytes(png_header_only(20000, 20000))
    f["deep_json"] = root / "deep.json"
    f["deep_json"].write_text("[" * 100_000 + "]" * 100_000)
    f["notes"] = root / "notes.txt"
    f["notes"].write_text("my notes\nline two\n")
    f["user_dir"] = root / "mine"
    f["user_dir"].mkdir()
    f["user_json"] = f["user_dir"] / "mine.json"
    f["user_json"].write_text(json.dumps([{"a": 1}, {"a": 2}, {"a": 3}]))
    f["synth_dir"] = root / "synth"
    from scout_data.cli import main as scout

    assert scout(["synth", "--out", str(f["synth_dir"]), "--num", "4", "--quiet"]) == 0
    f["synth_train"] = f["synth_dir"] / "train.json"
    f["answers"] = root / "answers.jsonl"
    f["answers"].write_text(json.dumps({"question_id": "q0", "text": "[0.1, 0.2, 0.3, 0.4]"}) + "\n")
    from llava_twist.eval.scout_questions import convert

    benches = convert(str(f["synth_train"]), str(root / "own-questions"))
    f["user_questions"] = root / "my-questions"
    f["user_questions"].mkdir()
    for bench in benches:  # the user's own files under every name the converter writes
        (f["user_questions"] / f"{bench}.jsonl").write_text('{"mine": 1}\n')
    f["user_question_file"] = f["user_questions"] / f"{sorted(benches)[0]}.jsonl"
    f["user_summary"] = root / "my-results"
    f["user_summary"].mkdir()
    f["user_summary_md"] = f["user_summary"] / "summary.md"
    f["user_summary_md"].write_text("my summary of last week\n")
    for name, image, box in [("train_json", "0.png", "[0.10, 0.20, 0.30, 0.40]"),
                             ("bad_box_json", "0.png", "[0.30, 0.20, 0.30, 0.40]"),
                             ("escape_json", "../images/0.png", "[0.10, 0.20, 0.30, 0.40]")]:
        f[name] = root / f"{name}.json"
        f[name].write_text(json.dumps([grounding_record(image, box)]))
    f["one_number_box_json"] = root / "one_number_box.json"
    f["one_number_box_json"].write_text(json.dumps([{**grounding_record("0.png", "[0.10, 0.20, 0.30, 0.40]"),
                                                     "answer_boxes_xyxy_norm": [5]}]))
    f["zero_png_dir"] = root / "zero-png"
    f["zero_png_dir"].mkdir()
    (f["zero_png_dir"] / "0.png").write_bytes(b"")
    f["zero_png_json"] = root / "zero_png.json"
    f["zero_png_json"].write_text(json.dumps([grounding_record("0.png", "[0.10, 0.20, 0.30, 0.40]")]))
    f["other_run"] = root / "other-run"  # a run's output folder whose last checkpoint was trained on another base
    (f["other_run"] / "checkpoint-3").mkdir(parents=True)
    f["other_run_config"] = f["other_run"] / "checkpoint-3" / "config.json"
    f["other_run_config"].write_text(json.dumps({"model_type": "llava_twist", "twist_base_fingerprint": "0" * 64}))
    f["root"] = root
    f["fifo"] = root / "records.fifo"
    os.mkfifo(f["fifo"])
    f["huge_json"] = root / "huge.json"  # sparse: 5 GB on paper, nothing on disk
    with open(f["huge_json"], "wb") as huge:
        huge.truncate(5 << 30)
    f["bomb_record_json"] = root / "bomb_record.json"
    f["bomb_record_json"].write_text(json.dumps([grounding_record("bomb.png", "[0.10, 0.20, 0.30, 0.40]")]))
    f["shared_refs"] = root / "refs(unc).p"  # one 1 MB sentence, pickled once, referenced by 2000 refs
    sentence = {"sent": "x" * (1 << 20), "sent_id": 0}
    f["shared_refs"].write_bytes(pickle.dumps([{"ref_id": i, "ann_id": i, "image_id": 1, "split": "train",
                                                "category_id": 1, "sentences": [sentence]} for i in range(2000)]))
    f["numbers_json"] = root / "numbers.json"
    f["numbers_json"].write_text(json.dumps([1, 2, 3]))
    twist = convert_llava_to_twist(tiny_llava, twist_layers="all")
    f["delta_bare"] = save_twist_delta(twist, root / "delta-bare")
    config = json.loads((f["delta_bare"] / "config.json").read_text())
    del config["twist_base_fingerprint"]
    (f["delta_bare"] / "config.json").write_text(json.dumps(config))
    f["delta_nan"] = save_twist_delta(twist, root / "delta-nan")
    weights = f["delta_nan"] / "twist_delta.safetensors"
    with safe_open(str(weights), framework="pt") as opened:
        metadata = opened.metadata()
    state = load_file(str(weights))
    first = sorted(state)[0]
    state[first] = torch.full_like(state[first], math.nan)
    save_file(state, str(weights), metadata=metadata)
    return {k: str(v) for k, v in f.items()}


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_bad_input_is_one_clear_line_and_loses_nothing(probe: Probe, files: dict[str, str]) -> None:
    before = {name: Path(files[name]).read_bytes() for name in probe.untouched}
    argv = [a.format(**files) if "{" in a else a for a in probe.argv.split()]
    message = probe.message.format(**files)
    assert_one_line(run_module(argv, cwd=REPO, env={"WORLD_SIZE": "1"}), message)
    for name, content in before.items():
        assert Path(files[name]).read_bytes() == content, f"{name} was changed"


LOADS_A_MODEL = ("llava_twist.serve.cli", "llava_twist.eval.model_grounding")


def probes_to_run_for_real() -> list[Probe]:
    """One probe of each command, and every probe of a command that loads a model (a fresh process is where a
    library's own warnings would show)."""
    chosen: dict[str, Probe] = {}
    for probe in PROBES:
        command = " ".join(probe.argv.split()[:2 if probe.argv.startswith("scout_data") else 1])
        chosen.setdefault(probe.name if command in LOADS_A_MODEL else command, probe)
    return list(chosen.values())


@pytest.mark.slow
@pytest.mark.parametrize("probe", probes_to_run_for_real(), ids=lambda p: p.argv.split()[0] + ": " + p.name)
def test_in_process_runs_match_real_processes(probe: Probe, files: dict[str, str]) -> None:
    """The probes run commands in this process (``run_module``); a real ``python -m`` prints the same."""
    argv = [a.format(**files) if "{" in a else a for a in probe.argv.split()]
    here = run_module(argv, cwd=REPO, env={"WORLD_SIZE": "1"})
    real = run_process(argv, cwd=REPO, env={"WORLD_SIZE": "1"})
    assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr)


def test_hub_ids_resolve_from_the_cache_as_llavas_loader_does(tiny_llava: Path, tmp_path: Path) -> None:
    """``--model-path liuhaotian/llava-v1.5-7b`` style ids, offline, from a cache laid out as the hub's."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--llava-v1.5-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in tiny_llava.iterdir():
        (snapshot / item.name).symlink_to(item)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (90, 90, 90)).save(image)
    proc = subprocess.run([sys.executable, "-m", "llava_twist.serve.cli", "--model-path", "tiny-org/llava-v1.5-tiny",
                           "--image-file", str(image), "--query", "Where?", "--max-new-tokens", "2", "--device", "cpu",
                           "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["model"] == "tiny-org/llava-v1.5-tiny"


def test_a_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    from scout_data.output import atomic_write

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "out.json", broken)
    assert list(tmp_path.iterdir()) == []


HELPED = ["llava_twist.tiny", "llava_twist.eval.model_grounding", "llava_twist.eval.eval_refexp",
          "llava_twist.serve.cli", "scout_data"]


@pytest.mark.parametrize("module", HELPED)
def test_help_names_the_command_a_user_types(module: str) -> None:
    proc = run_module([module, "--help"], cwd=REPO)
    usage = proc.stdout[:200]
    assert proc.returncode == 0 and usage.startswith(("usage: python -m ", "usage: scout-data")), usage


def test_validate_reports_an_answer_box_of_one_number_as_a_bad_record(files: dict[str, str]) -> None:
    """``validate``'s verdict on bad records is its report and exit status 1 (it once raised a traceback here)."""
    path = Path(files["one_number_box_json"])
    before = path.read_bytes()
    proc = run_module(["scout_data", "validate", path, "--image-folder", files["images"]], cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'answer_boxes_xyxy_norm[0]' must be [x1, y1, x2, y2] of four numbers, got 5" in proc.stdout
    assert path.read_bytes() == before

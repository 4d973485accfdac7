"""The fifth bad-input sweep, as tables (issue 48's own new probes): every command that reads a file given what is
not a regular file or is too big, every field of a checkpoint's config given what the model cannot use, every size
``tiny`` takes out of its range, crowded ``synth`` settings, damaged images, and worker requests. Each refusal is
one line naming the input (exit status 2), or an error chunk; inputs keep their bytes and no output is left."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from cli_checks import REPO, assert_one_line, run_module  # noqa: E402
from test_bad_inputs import TRAIN, grounding_record, png_header_only  # noqa: E402

# ----- inputs that are not regular files, or too big: every command that reads a file -----
KINDS = {  # name: (the input, a piece of the one-line refusal)
    "/dev/zero": ("/dev/zero", "/dev/zero: is a character device; expected a regular file"),
    "a FIFO": ("{fifo}", "is a pipe (FIFO); expected a regular file"),
    "a folder": ("{folder}", "{folder}"),
    "a 5 GB file": ("{huge}", "the limit is 4096 MiB"),
}
READERS = {  # command (``X``: the bad input), the file it must not write
    "validate": "scout_data validate X",
    "stats": "scout_data stats X",
    "preview": "scout_data preview X --image-folder {images} --out {out}/p.png",
    "mix --scout": "scout_data mix --scout X --replay {train} --out {out}/m.json",
    "mix --replay": "scout_data mix --scout {train} --replay X --out {out}/m.json",
    "coco --instances": "scout_data coco --instances X --images {images} --out {out}/coco",
    "refcoco --refs": "scout_data refcoco --refs X --instances {instances} --images {images} --out {out}/rc",
    "refcoco --instances": "scout_data refcoco --refs {refs} --instances X --images {images} --out {out}/rc",
    "vg --regions": "scout_data vg --regions X --image-data {regions} --images {images} --out {out}/vg",
    "vg --image-data": "scout_data vg --regions {regions} --image-data X --images {images} --out {out}/vg",
    "refexp --question-file": "llava_twist.eval.eval_refexp --question-file X --answers-file {answers} "
                              "--result-file {out}/r.json",
    "refexp --answers-file": "llava_twist.eval.eval_refexp --question-file {questions} --answers-file X "
                             "--result-file {out}/r.json",
    "retention --base-answers": "llava_twist.eval.eval_retention --question-file {questions} --base-answers X "
                                "--twist-answers {answers} --result-file {out}/r.json",
    "scout_questions": "llava_twist.eval.scout_questions --scout-json X --out-dir {out}/q",
    "model_grounding --question-file": "llava_twist.eval.model_grounding --model-path {model} --question-file X "
                                       "--image-folder {images} --answers-file {out}/a.jsonl --device cpu",
    "serve.cli --image-file": "llava_twist.serve.cli --model-path {model} --image-file X --query q --device cpu",
    "train --data_path": TRAIN + " --output_dir {out}/train --data_path X",
}
# an image may be at most 64 MiB: the 5 GB file is over that limit, stated so
IMAGE_READERS = {"serve.cli --image-file"}


@pytest.fixture(scope="module")
def files(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sweep-four")
    f: dict[str, Path] = {"root": root, "model": tiny_llava, "images": root / "images", "out": root / "out"}
    f["images"].mkdir()
    Image.new("RGB", (64, 48), (120, 120, 120)).save(f["images"] / "0.png")
    f["fifo"] = root / "input.fifo"
    os.mkfifo(f["fifo"])
    f["folder"] = root / "a-folder"
    f["folder"].mkdir()
    f["huge"] = root / "huge.json"
    with open(f["huge"], "wb") as huge:
        huge.truncate(5 << 30)
    f["train"] = root / "train.json"
    f["train"].write_text(json.dumps([grounding_record("0.png", "[0.10, 0.20, 0.30, 0.40]")]))
    f["questions"] = root / "q.jsonl"
    f["questions"].write_text(json.dumps({"question_id": "q0", "image": "0.png", "text": "Where?",
                                          "answer_boxes_xyxy_norm": [[0.1, 0.2, 0.3, 0.4]]}) + "\n")
    f["answers"] = root / "a.jsonl"
    f["answers"].write_text(json.dumps({"question_id": "q0", "text": "[0.1, 0.2, 0.3, 0.4]"}) + "\n")
    f["instances"] = root / "instances.json"
    f["instances"].write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    f["refs"] = root / "refs.p"
    f["refs"].write_bytes(b"\x80\x04]\x94.")  # an empty pickled list
    f["regions"] = root / "regions.json"
    f["regions"].write_text("[]")
    return {k: str(v) for k, v in f.items()}


def fill(text: str, files: dict[str, str]) -> str:
    return text.format(**files)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.stat().st_size < 1 << 20}


READER_CASES = [(reader, kind) for reader in READERS for kind in KINDS]


@pytest.mark.parametrize(("reader", "kind"), READER_CASES, ids=[f"{r} {k}" for r, k in READER_CASES])
def test_every_reader_refuses_what_is_not_a_regular_file_or_too_big(reader: str, kind: str, files: dict[str, str],
                                                                    tmp_path: Path) -> None:
    files = {**files, "out": str(tmp_path / "out")}
    bad, message = (fill(x, files) for x in KINDS[kind])
    if kind == "a 5 GB file" and reader in IMAGE_READERS:
        message = "the limit is 64 MiB"
    before = snapshot(Path(files["root"]))
    argv = [a.replace("X", bad) if a == "X" else fill(a, files) for a in READERS[reader].split()]
    proc = run_module(argv, cwd=REPO, env={"WORLD_SIZE": "1"})
    assert_one_line(proc, message)
    assert snapshot(Path(files["root"])) == before
    assert not Path(files["out"]).exists()


# ----- a checkpoint's config.json: every field the model cannot use -----
CONFIG_CASES = [  # fields set, a piece of the refusal
    ({"twist_mix_inti": 0.0}, "unknown field 'twist_mix_inti' (did you mean 'twist_mix_init'?)"),
    ({"twist_layer": "all"}, "unknown field 'twist_layer' (did you mean 'twist_layers'?)"),
    ({"twist_routr": "prompt"}, "unknown field 'twist_routr'"),
    ({"twist_": 1}, "unknown field 'twist_'"),
    ({"mm_vision_towr": "x"}, "unknown field 'mm_vision_towr' (did you mean 'mm_vision_tower'?)"),
    ({"image_aspect_ration": "pad"}, "unknown field 'image_aspect_ration' (did you mean 'image_aspect_ratio'?)"),
    ({"hidden_sizes": 64}, "unknown field 'hidden_sizes' (did you mean 'hidden_size'?)"),
    ({"head_dim": 16}, "unknown field 'head_dim'"),
    ({"mlp_bias": True}, "unknown field 'mlp_bias'"),
    ({"a": 1, "b": 2}, "unknown fields 'a', 'b'"),
    ({"mm_vision_select_layer": 99}, "mm_vision_select_layer 99 is not one of the vision tower's 3 hidden states"),
    ({"mm_vision_select_layer": 3}, "mm_vision_select_layer 3 is not one of the vision tower's 3 hidden states"),
    ({"mm_vision_select_layer": -4}, "mm_vision_select_layer -4 is not one of"),
    ({"mm_vision_select_layer": -1000}, "mm_vision_select_layer -1000 is not one of"),
    ({"mm_vision_select_layer": "x"}, "mm_vision_select_layer 'x' is not a int"),
    ({"mm_vision_select_layer": True}, "mm_vision_select_layer True is not a int"),
    ({"mm_vision_select_layer": 1.5}, "mm_vision_select_layer 1.5 is not a int"),
    ({"mm_vision_select_feature": "weird"}, "mm_vision_select_feature 'weird' is not one LLaVA knows"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature 'cls' is not one LLaVA knows"),
    ({"mm_vision_select_feature": 3}, "mm_vision_select_feature 3 is not one LLaVA knows"),
    ({"mm_projector_type": "mlp2x_relu"}, "mm_projector_type 'mlp2x_relu' is not one LLaVA builds"),
    ({"mm_projector_type": "resampler"}, "mm_projector_type 'resampler' is not one LLaVA builds"),
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres' needs image_grid_pinpoints"),
    ({"image_aspect_ratio": 3}, "image_aspect_ratio 3 is not one LLaVA knows"),
    ({"num_attention_heads": 3}, "do not divide"),
    ({"max_position_embeddings": 0}, "max_position_embeddings 0 is not a positive integer"),
    ({"vocab_size": -1}, "vocab_size -1 is not a positive integer"),
    ({"mm_use_im_start_end": "no"}, "mm_use_im_start_end 'no' is not a bool"),
]
TOWER_CASES = [
    ({"image_size": 8}, "image_size 8 is smaller than patch_size 14"),
    ({"patch_size": 100}, "image_size 56 is smaller than patch_size 100"),
    ({"patch_size": 0}, "patch_size 0 is not a positive integer"),
    ({"image_size": "56"}, "image_size '56' is not a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers 0 is not a positive integer"),
]


def checkpoint_copy(model: Path, to: Path) -> Path:
    shutil.copytree(model, to)
    config = json.loads((to / "config.json").read_text())
    config["mm_vision_tower"] = str(to / "clip-vision-tower")
    (to / "config.json").write_text(json.dumps(config))
    return to


@pytest.mark.parametrize(("fields", "message"), CONFIG_CASES + [({"tower": f}, m) for f, m in TOWER_CASES],
                         ids=[json.dumps(f) for f, _ in CONFIG_CASES] + [f"tower {json.dumps(f)}"
                                                                         for f, _ in TOWER_CASES])
def test_the_config_check_refuses_every_field_the_model_cannot_use(fields: dict, message: str, tiny_llava: Path,
                                                                    tmp_path: Path) -> None:
    folder = checkpoint_copy(tiny_llava, tmp_path / "model")
    path = folder / ("clip-vision-tower" if "tower" in fields else "") / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields.get("tower", fields)}))
    before = snapshot(folder)
    image = tmp_path / "0.png"
    Image.new("RGB", (40, 30)).save(image)
    proc = run_module(["llava_twist.serve.cli", "--model-path", folder, "--image-file", image, "--query", "q",
                       "--max-new-tokens", "2", "--device", "cpu"], cwd=tmp_path)
    assert_one_line(proc, str(path), message)
    assert snapshot(folder) == before


# ----- tiny: every size in its range -----
TINY_FLAGS = {"hidden-size": (8, 1024), "intermediate-size": (8, 4096), "num-hidden-layers": (1, 16),
              "num-attention-heads": (1, 64), "vocab-size": (512, 32000), "vision-hidden-size": (8, 1024),
              "vision-layers": (1, 24), "vision-heads": (1, 64), "image-size": (8, 448), "patch-size": (1, 448),
              "max-position-embeddings": (128, 8192), "seed": (0, 2**32 - 1)}
TINY_CASES = [(flag, value) for flag, (lo, hi) in TINY_FLAGS.items() for value in (str(lo - 1), str(hi + 1), "1.5")]
TINY_COMBINATIONS = [
    ("--hidden-size 60 --num-attention-heads 8", "--hidden-size 60 must be a multiple of --num-attention-heads 8"),
    ("--vision-hidden-size 30 --vision-heads 4", "--vision-hidden-size 30 must be a multiple of --vision-heads 4"),
    ("--image-size 28 --patch-size 56", "--patch-size 56 must be at most --image-size 28"),
    ("--image-size 448 --patch-size 4", "the image alone takes 12544 positions"),
    ("--image-size 224 --patch-size 14 --max-position-embeddings 256", "at least 320 are needed"),
]


@pytest.mark.parametrize(("flag", "value"), TINY_CASES, ids=[f"--{f} {v}" for f, v in TINY_CASES])
def test_tiny_refuses_each_size_out_of_range(flag: str, value: str, tmp_path: Path) -> None:
    proc = run_module(["llava_twist.tiny", "--out", tmp_path / "t", f"--{flag}", value])
    assert value in assert_one_line(proc, f"argument --{flag}: ")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(("flags", "message"), TINY_COMBINATIONS, ids=[f for f, _ in TINY_COMBINATIONS])
def test_tiny_refuses_sizes_that_do_not_combine(flags: str, message: str, tmp_path: Path) -> None:
    proc = run_module(["llava_twist.tiny", "--out", tmp_path / "t", *flags.split()])
    assert_one_line(proc, message)
    assert not (tmp_path / "t").exists()


# ----- synth: settings it cannot honour -----
SYNTH_CASES = ["--image-size 32 --min-objects 9 --max-objects 9",
               "--image-size 48 --min-objects 20 --max-objects 30",
               "--image-size 64 --min-objects 40 --max-objects 40",
               "--image-size 100 --min-objects 64 --max-objects 64",
               "--image-size 64x32 --min-objects 20 --max-objects 20",
               "--image-size 128 --min-objects 60 --max-objects 64 --sizes large",
               "--image-size 64 --min-objects 20 --max-objects 20 --min-gap 8",
               "--image-size 128 --min-objects 20 --max-objects 20"]  # the fourth sweep's: fewer in 39 of 40 scenes


@pytest.mark.parametrize("flags", SYNTH_CASES)
def test_synth_refuses_objects_that_cannot_fit(flags: str, tmp_path: Path) -> None:
    proc = run_module(["scout_data", "synth", "--out", tmp_path / "s", "--num", "4", "--quiet", *flags.split()])
    assert_one_line(proc, "that many objects do not fit")
    assert not (tmp_path / "s").exists()


# ----- damaged images, to each image reader -----
def image_bytes(kind: str) -> bytes:
    buffer = io.BytesIO()
    noise = Image.effect_noise((120, 90), 60).convert("RGB")
    if kind == "empty":
        return b""
    if kind == "text":
        return b"not an image at all\n"
    if kind == "bomb":
        return png_header_only(20000, 20000)
    if kind == "long strip":
        Image.new("RGB", (20000, 8)).save(buffer, format="PNG")
    elif kind == "1x1":
        Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    elif kind.startswith("truncated"):
        noise.save(buffer, format="JPEG" if "JPEG" in kind else "PNG")
        return buffer.getvalue()[: len(buffer.getvalue()) // 2]
    elif kind == "9000 wide":
        Image.new("L", (9000, 300)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_KINDS = {"empty": "cannot be read as an image", "text": "cannot be read as an image",
               "bomb": "cannot be read as an image", "long strip": "the long side may be at most",
               "1x1": "both sides must be at least", "truncated JPEG": "cannot be read as an image",
               "truncated PNG": "cannot be read as an image", "9000 wide": "the long side may be at most 8192"}


@pytest.mark.parametrize("kind", IMAGE_KINDS)
@pytest.mark.parametrize("reader", ["serve.cli", "preview"])
def test_each_image_reader_refuses_a_damaged_image_in_one_line(reader: str, kind: str, tiny_llava: Path,
                                                                tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    image = tmp_path / "images" / "x.png"
    image.write_bytes(image_bytes(kind))
    if reader == "serve.cli":
        argv = ["llava_twist.serve.cli", "--model-path", tiny_llava, "--image-file", image, "--query", "q",
                "--device", "cpu"]
    else:
        (tmp_path / "r.json").write_text(json.dumps([grounding_record("x.png", "[0.10, 0.20, 0.30, 0.40]")]))
        argv = ["scout_data", "preview", tmp_path / "r.json", "--image-folder", tmp_path / "images", "--out",
                tmp_path / "p.png"]
    before = image.read_bytes()
    assert_one_line(run_module(argv, cwd=tmp_path), str(image), IMAGE_KINDS[kind])
    assert image.read_bytes() == before and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_validate_reports_a_record_whose_image_the_model_would_refuse(kind: str, tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(image_bytes(kind))
    (tmp_path / "r.json").write_text(json.dumps([grounding_record("x.png", "[0.10, 0.20, 0.30, 0.40]")]))
    proc = run_module(["scout_data", "validate", tmp_path / "r.json", "--image-folder", tmp_path])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "1 records, 1 bad" in proc.stderr and str(tmp_path / "x.png") in proc.stdout


# ----- worker requests: each gets an error chunk naming its problem -----
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PROMPT = "USER: <image>\nWhere is it? ASSISTANT:"
REQUESTS = [  # the request body (bytes or JSON), a piece of the error chunk
    (b"", "the body is not JSON"),
    (b"{not json", "the body is not JSON"),
    (b"\xff\xfe", "the body is not JSON"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    ([], "the request is list; expected a JSON object"),
    ("prompt", "the request is str"),
    (None, "the request is NoneType"),
    ({}, "prompt is None"),
    ({"prompt": ""}, "prompt is ''"),
    ({"prompt": 5}, "prompt is 5"),
    ({"prompt": "USER: hi \ud800 ASSISTANT:"}, "prompt holds a lone surrogate"),
    ({"prompt": "USER: hi ASSISTANT:", "stop": "\udfff"}, "stop holds a lone surrogate"),
    ({"prompt": "USER: hi ASSISTANT:", "stop": 1}, "stop is 1"),
    ({"prompt": "USER: hi ASSISTANT:", "temperature": -1}, "temperature is -1"),
    ({"prompt": "USER: hi ASSISTANT:", "temperature": "1"}, "temperature is '1'"),
    ({"prompt": "USER: hi ASSISTANT:", "temperature": 1e308 * 10}, "temperature"),
    ({"prompt": "USER: hi ASSISTANT:", "top_p": 1.5}, "top_p is 1.5"),
    ({"prompt": "USER: hi ASSISTANT:", "max_new_tokens": -5}, "max_new_tokens is -5"),
    ({"prompt": "USER: hi ASSISTANT:", "max_new_tokens": True}, "max_new_tokens is True"),
    ({"prompt": "USER: hi ASSISTANT:", "twist_route": "both"}, "twist_route is 'both'"),
    ({"prompt": "USER: hi ASSISTANT:", "images": "abc"}, "images must be a list"),
    ({"prompt": PROMPT, "images": ["%%%"]}, "image 0 is not valid base64"),
    ({"prompt": PROMPT, "images": [b64(b"")]}, "image 0: cannot be decoded as an image"),
    ({"prompt": PROMPT, "images": [b64(png_header_only(20000, 20000))]}, "image 0: cannot be decoded as an image"),
    ({"prompt": PROMPT, "images": [b64(image_bytes("truncated JPEG"))]}, "image 0: cannot be decoded as an image"),
    ({"prompt": PROMPT, "images": [b64(image_bytes("truncated PNG"))]}, "image 0: cannot be decoded as an image"),
    ({"prompt": PROMPT, "images": [b64(image_bytes("1x1"))]}, "both sides must be at least"),
    ({"prompt": PROMPT, "images": [b64(image_bytes("long strip"))]}, "the long side may be at most"),
    ({"prompt": PROMPT, "images": []}, "the prompt has 1 <image> token(s) and the request 0 image(s)"),
    ({"prompt": "USER: hi ASSISTANT:", "images": [b64(image_bytes("1x1"))]}, "has 0 <image> token(s)"),
    ({"prompt": PROMPT + "<image>", "images": [b64(image_bytes("1x1"))] * 2}, "this worker answers about one image"),
    ({"prompt": "x" * 3_000_000}, "shorten the question"),
    ({"prompt": "red, " * 2000}, "the model's context is"),
]


@pytest.fixture(scope="module")
def worker(tiny_llava: Path):  # noqa: ANN201 - a TwistModelWorker
    from llava_twist.serve.inference import load_model
    from llava_twist.serve.model_worker import TwistModelWorker

    return TwistModelWorker(load_model(str(tiny_llava), device="cpu"), "m", "http://w", "http://c")


@pytest.mark.parametrize(("body", "message"), REQUESTS, ids=[str(i) for i in range(len(REQUESTS))])
def test_each_bad_request_gets_one_error_chunk_naming_it(body: object, message: str, worker) -> None:  # noqa: ANN001
    from test_worker_bounds import call, chunks_of

    from llava_twist.serve.model_worker import build_app

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    chunks = chunks_of(call(build_app(worker), [{"type": "http.request", "body": raw, "more_body": False}]))
    assert len(chunks) == 1 and chunks[0]["error_code"] == 1 and message in chunks[0]["text"], chunks
    assert chunks[0]["text"].startswith("bad request: ") and worker.queue_length() == 0


# ----- the minor ones -----
def test_save_image_never_writes_into_the_model_folder(tiny_llava: Path, tmp_path: Path) -> None:
    image = tmp_path / "0.png"
    Image.new("RGB", (40, 30)).save(image)
    proc = run_module(["llava_twist.serve.cli", "--model-path", tiny_llava, "--image-file", image, "--query", "q",
                       "--device", "cpu", "--save-image", tiny_llava / "drawn.png"], cwd=tmp_path)
    assert_one_line(proc, "--save-image", "which this command reads")
    assert not (tiny_llava / "drawn.png").exists()


def test_a_repeated_coco_image_id_is_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    images = [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10},
              {"id": 1, "file_name": "b.jpg", "width": 20, "height": 20}]
    (tmp_path / "i.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    proc = run_module(["scout_data", "coco", "--instances", tmp_path / "i.json", "--images", tmp_path / "images",
                       "--out", tmp_path / "out"])
    assert_one_line(proc, "images[1] repeats the id 1 of images[0]")
    assert not (tmp_path / "out").exists()


def test_validate_names_the_stored_box_that_differs(tmp_path: Path) -> None:
    record = {**grounding_record("x.png", "[0.10, 0.20, 0.30, 0.40]"), "answer_boxes_xyxy_norm": [[0.1, 0.2, 0.3, 4]]}
    (tmp_path / "r.json").write_text(json.dumps([record]))
    proc = run_module(["scout_data", "validate", tmp_path / "r.json"])
    assert proc.returncode == 1 and "answer box in the text [0.1, 0.2, 0.3, 0.4] != stored [0.1, 0.2, 0.3, 4]" in (
        proc.stdout), proc.stdout


def test_a_worker_silent_mid_answer_is_reported_as_silent() -> None:
    from test_worker_bounds import FIRST, fake_worker

    from llava_twist.serve.worker_protocol import stream_chunks

    def talk(send) -> None:  # noqa: ANN001
        send(FIRST)
        threading.Event().wait(5)

    chunks = list(stream_chunks(next(iter(fake_worker(talk))), {}, read_timeout=1.0))
    assert "went silent mid-answer for 1 s" in chunks[-1]["text"], chunks[-1]

"""The playground's backend on its own (no server): streaming steps, boxes in original-image pixels, the tiny
model behind it, model resolution, errors, and the bundled examples."""

from __future__ import annotations

import gc
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from llava_twist.serve.inference import GenerationSettings
from llava_twist.serve.result import result_from_text
from playground import app, models, panels
from playground.app import Backend, PlaygroundError
from playground.pointer import POINTER_FILE
from scout_data.palette import ANSWER_COLOUR, STEP_COLOURS

AUTO, FROZEN, GROUNDING = app.ROUTE_LABELS["auto"], app.ROUTE_LABELS["frozen"], app.ROUTE_LABELS["grounding"]
BACKGROUND = (200, 200, 200)
# 200x100 image: LLaVA sees a 200x200 square with the image 50 px down; boxes below are in that padded frame.
CHAIN = (
    "Step 1: I look for the circles.\n"
    "Step 2: One candidate: circle [0.25, 0.30, 0.50, 0.45].\n"
    "Answer: [0.60, 0.40, 0.90, 0.70]"
)
STEP2_PX = (50.0, 10.0, 100.0, 40.0)  # y: 0.30*200 - 50 = 10, 0.45*200 - 50 = 40
ANSWER_PX = (120.0, 30.0, 180.0, 90.0)


def chunks(text: str) -> list[str]:
    """Token-sized pieces, as a tokenizer streams them."""
    return re.findall(r"\s*\S{1,3}", text)


def fake_generator(text: str):
    seen: list[tuple[str, GenerationSettings]] = []

    def generate(query: str, image: Image.Image, settings: GenerationSettings) -> Iterator[str]:
        seen.append((query, settings))
        yield from chunks(text)

    generate.seen = seen  # type: ignore[attr-defined]
    return generate


def grey(w: int = 200, h: int = 100) -> Image.Image:
    return Image.new("RGB", (w, h), BACKGROUND)


def test_boxes_land_on_original_pixels_of_a_non_square_image() -> None:
    backend = Backend(None, generate_fn=fake_generator(CHAIN))
    final = list(backend.stream("q", grey(), GenerationSettings()))[-1]
    assert final.done
    data = final.data()
    assert data["image_size"] == [200, 100] and data["box_frame"] == "padded"
    assert [s["boxes_xyxy_px"] for s in data["steps"]] == [[], [list(STEP2_PX)]]
    assert data["answer_boxes_xyxy_px"] == [list(ANSWER_PX)]
    im = final.image
    assert im.size == (400, 200)  # under 320 px wide: drawn on a copy enlarged twice, boxes at twice their pixels
    step2 = STEP_COLOURS[1]
    assert im.getpixel((100, 50)) == step2 and im.getpixel((199, 50)) == step2  # left and right edges
    assert im.getpixel((150, 79)) == step2  # bottom edge
    assert im.getpixel((150, 50)) == BACKGROUND  # inside stays the image
    assert im.getpixel((100, 150)) == BACKGROUND  # where the unconverted padded-frame box would be
    assert im.getpixel((240, 120)) == ANSWER_COLOUR and im.getpixel((359, 120)) == ANSWER_COLOUR
    html = final.html()
    assert 'data-step="2" data-boxes="1"' in html and "[50, 10, 100, 40] px" in html
    assert "rgb({}, {}, {})".format(*step2) in html and '<div class="twist-answer" data-boxes="1"' in html


def test_a_small_image_is_drawn_at_least_320_px_wide_with_boxes_in_its_own_pixels() -> None:
    small = Image.new("RGB", (64, 64), BACKGROUND)
    small.putpixel((10, 10), (255, 0, 0))
    text = "Step 1: the cross [0.25, 0.25, 0.50, 0.50].\nAnswer: [0.50, 0.50, 0.75, 0.75]"
    updates = list(Backend(None, generate_fn=fake_generator(text)).stream("q", small, GenerationSettings()))
    assert all(u.image.size == (320, 320) for u in updates)  # every update, the first (no box yet) too
    final = updates[-1]
    assert final.data()["answer_boxes_xyxy_px"] == [[32.0, 32.0, 48.0, 48.0]]  # the image's own pixels
    im = final.image
    assert im.getpixel((52, 52)) == (255, 0, 0) and im.getpixel((54, 54)) == (255, 0, 0)  # pixels kept sharp
    assert im.getpixel((160, 200)) == ANSWER_COLOUR and im.getpixel((80, 100)) == STEP_COLOURS[0]
    sliver = list(Backend(None, generate_fn=fake_generator(text)).stream("q", grey(2, 3000), GenerationSettings()))
    assert sliver[-1].image.size == (2, 3000)  # enlarging would pass 4096 px on the long side: drawn as it is


def test_steps_and_boxes_stream_in_order() -> None:
    backend = Backend(None, generate_fn=fake_generator(CHAIN))
    updates = list(backend.stream("q", grey(), GenerationSettings()))
    assert len(updates) >= 4 and [u.done for u in updates].count(True) == 1 and updates[-1].done
    steps = [len(u.result.chain.steps) for u in updates]
    boxes = [len(u.result.boxes) for u in updates]
    assert steps == sorted(steps) and boxes == sorted(boxes) and boxes[-1] == 2
    first_box = boxes.index(1)
    mid = updates[first_box]
    assert not mid.done and not mid.result.chain.has_answer_line
    assert mid.image.getpixel((100, 50)) == STEP_COLOURS[1]  # drawn while the answer is still being written
    assert mid.image.getpixel((240, 120)) == BACKGROUND
    assert "twist-pending" in mid.html() and "so far" in mid.info()
    assert updates[0].image.getpixel((100, 50)) == BACKGROUND


def test_run_yields_both_panels_and_reports_missing_boxes() -> None:
    gen = fake_generator("The circle is red.")
    backend = Backend(None, generate_fn=gen)
    outs = list(backend.run(grey(), "What colour is the circle?", GROUNDING, True, 0.7, 40))
    first, last = outs[0], outs[-1]
    assert len(last) == 8 and first[4] is None  # the original-LLaVA panel fills after TWIST is done
    assert panels.NO_BOX in last[2] and panels.NO_BOX in last[6]
    assert last[3]["done"] and last[3]["boxes"] == [] and last[7]["done"]
    assert [(s.route, s.temperature, s.max_new_tokens) for _, s in gen.seen] == [
        ("grounding", 0.7, 40), ("frozen", 0.7, 40)
    ]
    only = list(Backend(None, generate_fn=fake_generator(CHAIN)).run(grey(), "q", AUTO, False, 0.0, 16))
    assert all(o[4] is None and o[7] is None for o in only) and panels.NO_BOX not in only[-1][2]


def test_text_that_gives_no_step_is_shown_as_the_model_wrote_it() -> None:
    text = "Step 1: Step 2: the <b> [0.30, 0.30,"
    final = list(Backend(None, generate_fn=fake_generator(text)).stream("q", grey(), GenerationSettings()))[-1]
    assert final.done and not final.result.boxes
    assert 'class="twist-raw"' in final.html() and "Step 1: Step 2: the &lt;b&gt; [0.30, 0.30," in final.html()
    assert "2 steps · 0 boxes" in final.info()
    parsed = list(Backend(None, generate_fn=fake_generator(CHAIN)).stream("q", grey(), GenerationSettings()))[-1]
    assert "twist-raw" not in parsed.html()


def test_answer_without_box_but_steps_with_boxes() -> None:
    text = "Step 1: A circle [0.10, 0.30, 0.20, 0.50].\nAnswer: it is red."
    final = list(Backend(None, generate_fn=fake_generator(text)).stream("q", grey(), GenerationSettings()))[-1]
    assert panels.NO_ANSWER_BOX in final.info() and panels.NO_BOX not in final.info()
    assert final.image.getpixel((40, 60)) == STEP_COLOURS[0]


@pytest.mark.parametrize(
    ("image", "query", "route", "message"),
    [
        (None, "q", AUTO, "No image"),
        (Image.new("RGB", (4, 40)), "q", AUTO, "at least 8"),
        (grey(), "   ", AUTO, "Type a question"),
        (grey(), "x" * (app.MAX_QUERY_CHARS + 1), AUTO, "characters"),
        (grey(), "q", "Sideways", "Unknown route"),
    ],
)
def test_bad_input_is_a_clear_ui_error(image: Image.Image | None, query: str, route: str, message: str) -> None:
    backend = Backend(None, generate_fn=fake_generator(CHAIN))
    with pytest.raises(gr.Error, match=message):
        list(backend.run(image, query, route, False, 0.0, 16))


def test_generation_failure_is_a_ui_error_and_frees_the_lock() -> None:
    def broken(query: str, image: Image.Image, settings: GenerationSettings) -> Iterator[str]:
        yield "Step 1: "
        raise RuntimeError("out of memory")

    backend = Backend(None, generate_fn=broken)
    with pytest.raises(gr.Error, match="Generation failed: RuntimeError: out of memory"):
        list(backend.run(grey(), "q", AUTO, False, 0.0, 16))
    assert backend.lock.acquire(timeout=5)


def test_closed_request_finishes_its_generation_before_freeing_the_lock() -> None:
    produced: list[str] = []
    first_read, may_go_on = threading.Event(), threading.Event()

    def gen(query: str, image: Image.Image, settings: GenerationSettings) -> Iterator[str]:
        for i, piece in enumerate(chunks(CHAIN)):
            if i == 1:
                first_read.set()
                assert may_go_on.wait(10)
            produced.append(piece)
            yield piece

    backend = Backend(None, generate_fn=gen)
    run = backend.run(grey(), "q", AUTO, True, 0.0, 16)  # compare: a second generation would follow
    next(run)
    assert first_read.wait(10) and backend.lock.locked()
    run.close()  # returns at once; the generation goes on to its end on the job's thread, then frees the lock
    may_go_on.set()
    assert backend.lock.acquire(timeout=5) and "".join(produced) == CHAIN  # the closed request's base run skipped


def test_an_abandoned_request_frees_the_lock_without_being_finalised() -> None:
    """Gradio drops a cancelled handler without closing it; the lock must not wait for the garbage collector."""
    backend = Backend(None, generate_fn=fake_generator(CHAIN))
    runs = [backend.run(grey(), "q", AUTO, False, 0.0, 16)]
    next(runs[0])
    runs.append(runs)  # a reference cycle: only the cyclic collector would finalise it
    gc.disable()
    try:
        assert backend.lock.acquire(timeout=5)
        backend.lock.release()
        final = list(backend.run(grey(), "next", AUTO, False, 0.0, 16))[-1]
    finally:
        gc.enable()
    assert final[3]["done"]


def test_checked_image_rejects_unreadable_and_huge_uploads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradio.data_classes import ImageData

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    comp = app.checked_image(type="pil")
    assert type(comp) is gr.Image
    with pytest.raises(gr.Error, match="notes.png is not an image"):
        comp.preprocess(ImageData(path=str(bad), orig_name="notes.png"))
    good = tmp_path / "ok.png"
    grey(300, 200).save(good)
    assert comp.preprocess(ImageData(path=str(good), orig_name="ok.png")).size == (300, 200)
    from scout_data import images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    with pytest.raises(gr.Error, match="ok.png cannot be used: it is 300x200 = 0 megapixels"):
        comp.preprocess(ImageData(path=str(good), orig_name="ok.png"))


@pytest.mark.parametrize("kind", ["decompression bomb", "truncated JPEG"])
def test_uploads_that_do_not_decode_get_one_message(kind: str, tmp_path: Path) -> None:
    """A PNG header claiming 20000x20000 and a cut JPEG got Gradio's generic error and a traceback in the log."""
    import io
    import struct
    import zlib

    from gradio.data_classes import ImageData

    if kind == "truncated JPEG":
        buffer = io.BytesIO()
        Image.effect_noise((300, 200), 60).convert("RGB").save(buffer, format="JPEG")
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]  # the header whole, half the scan
    else:
        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
        data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
    upload = tmp_path / "upload.img"
    upload.write_bytes(data)
    comp = app.checked_image(type="pil")
    with pytest.raises(gr.Error, match="upload.img is not an image this app can read"):
        comp.preprocess(ImageData(path=str(upload), orig_name="upload.img"))


def test_tiny_model_answers_through_the_backend(tiny_llava: Path) -> None:
    backend = app.create_backend(str(tiny_llava), device="cpu")
    assert "converted to TWIST" in backend.description and "parameters" in backend.description
    outs = list(backend.run(grey(), "Where is the circle? Answer step by step.", AUTO, True, 0.0, 12))
    twist, base = outs[-1][3], outs[-1][7]
    assert twist["done"] and twist["text"] and twist["image_size"] == [200, 100]
    assert twist["route"] in ("frozen", "grounding") and not twist["route_forced"]
    assert 0.0 <= twist["router_prob"] <= 1.0 and "router p(grounding)" in outs[-1][2]
    assert base["route"] == "frozen" and base["route_forced"] and "forced" in outs[-1][6]
    # an untrained router picks the frozen route: both panels are then the original model's answer
    assert twist["route"] != "frozen" or twist["text"] == base["text"]
    assert (panels.NO_BOX in outs[-1][2]) == (twist["boxes"] == [])
    forced = list(backend.run(grey(), "Find the square.", GROUNDING, False, 0.0, 8))[-1]
    assert forced[3]["route"] == "grounding" and forced[3]["route_forced"]


def test_model_source_resolution(tmp_path: Path, tiny_llava: Path) -> None:
    with pytest.raises(PlaygroundError, match="--model-base needs --model-path"):
        app.resolve_model_source(None, str(tiny_llava), demo_dir=tmp_path / "none", tiny_dir=tmp_path / "tiny")
    given = app.resolve_model_source(str(tiny_llava), None)
    assert given.model_path == str(tiny_llava) and "LLaVA-1.5 checkpoint" in given.label
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / POINTER_FILE).write_text(json.dumps({"model_path": "twist", "model_base": "../base"}))
    found = app.resolve_model_source(None, None, demo_dir=demo, tiny_dir=tmp_path / "tiny")
    assert found.model_path == str(demo / "twist") and found.model_base == str(tmp_path / "base")
    assert "demo's trained TWIST model" in found.label and not (tmp_path / "tiny").exists()
    (demo / POINTER_FILE).write_text("{}")
    with pytest.raises(PlaygroundError, match="model_path"):
        models.find_demo_model(demo)


def test_the_demo_model_comes_with_held_out_scenes_of_its_own_world(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from playground.make_examples import write_record_examples
    from playground.pointer import write_pointer

    world = tmp_path / "world"
    (world / "images").mkdir(parents=True)
    grey(64, 64).save(world / "images" / "s0.png")
    record = {"id": "s0", "image": "s0.png", "kind": "refexp", "answer_boxes_xyxy_px": [[8.0, 8.0, 24.0, 24.0]],
              "conversations": [{"from": "human", "value": "<image>\nFind the red circle. Answer step by step."},
                                {"from": "gpt", "value": "Step 1: the red circle [0.12, 0.12, 0.38, 0.38].\n"
                                                         "Answer: [0.12, 0.12, 0.38, 0.38]"}]}
    demo = tmp_path / "data" / "demo"
    write_record_examples([record], world / "images", demo / "examples")
    write_pointer(demo, demo / "twist", demo / "base", "the demo's TWIST", demo / "examples")
    source = app.resolve_model_source(None, None, demo_dir=demo, tiny_dir=tmp_path / "tiny")
    assert source.examples == str((demo / "examples").resolve())
    (entry,) = app.load_examples(source.examples)
    assert entry["query"] == "Find the red circle. Answer step by step." and Path(entry["path"]).is_file()
    got = result_from_text(entry["reference"], (64, 64), "padded").answer_boxes_xyxy_px
    assert [round(v) for v in got[0]] == [8, 8, 24, 24]
    monkeypatch.setattr(app, "DATA_DIR", tmp_path / "data")
    served = app.servable_examples(source.examples)  # the server never serves playground/data: a copy
    assert not served.is_relative_to(tmp_path) and (served / "examples.json").is_file()
    assert app.servable_examples(app.EXAMPLES_DIR) == app.EXAMPLES_DIR.resolve()
    backend = Backend(None, generate_fn=fake_generator(CHAIN), examples_dir=served)
    with app.build_demo(backend) as blocks:
        assert "Held-out scenes of the model's own world" in json.dumps(blocks.config)
    assert Backend(None, generate_fn=fake_generator(CHAIN)).examples_dir == app.EXAMPLES_DIR


def test_tiny_default_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_build(out: Path) -> Path:
        calls.append(out)
        out.mkdir(parents=True)
        (out / models.TINY_DONE).write_text("{}")
        return out

    monkeypatch.setattr("llava_twist.tiny.build_tiny_llava", fake_build)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text("{}")  # an interrupted build is rebuilt
    src = app.resolve_model_source(None, None, demo_dir=tmp_path / "no-demo", tiny_dir=tiny)
    assert src.model_path == str(tiny) and "random weights" in src.label
    assert not (tiny / "config.json").exists()
    app.resolve_model_source(None, None, demo_dir=tmp_path / "no-demo", tiny_dir=tiny)
    assert calls == [tiny]


def test_bundled_examples_are_small_and_their_references_hit_the_objects() -> None:
    examples = app.load_examples()
    files = [Path(e["path"]) for e in examples]
    assert len(examples) >= 3 and all(f.parent == app.EXAMPLES_DIR for f in files)
    assert sum(f.stat().st_size for f in app.EXAMPLES_DIR.iterdir()) < 50_000
    sizes = set()
    for e, f in zip(examples, files, strict=True):
        with Image.open(f) as im:
            size = im.size
        sizes.add(size[0] == size[1])
        got = result_from_text(e["reference"], size, "padded").answer_boxes_xyxy_px
        assert len(got) == len(e["answer_boxes_xyxy_px"])
        for box, want in zip(got, e["answer_boxes_xyxy_px"], strict=True):
            assert max(abs(a - b) for a, b in zip(box, want, strict=True)) <= 0.01 * max(size) + 1
    assert False in sizes  # non-square scenes exercise the padded frame


def test_command_line(tmp_path: Path, tiny_llava: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    from playground import __main__ as cli

    assert cli.main(["--model-path", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    launched: list[tuple] = []
    monkeypatch.setattr(cli, "launch", lambda demo, *args, **kw: launched.append((demo, *args, kw)))
    assert cli.main(["--model-path", str(tiny_llava), "--device", "cpu", "--port", "7999"]) == 0
    demo, host, port, max_size, kw = launched[0]
    assert isinstance(demo, gr.Blocks) and (host, port, max_size) == ("127.0.0.1", 7999, app.MAX_FILE_SIZE)
    assert kw == {"examples_dir": app.EXAMPLES_DIR}  # a checkpoint given by path: the bundled scenes
    assert "converted to TWIST" in capsys.readouterr().out

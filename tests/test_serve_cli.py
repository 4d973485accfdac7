"""The inference CLI end to end on the tiny LLaVA (``python -m`` as ``cli_checks.run_module`` runs it), its report
and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from llava_twist.serve import cli
from llava_twist.serve.drawing import draw_boxes
from llava_twist.serve.result import result_from_text

sys.path.insert(0, str(Path(__file__).parent))
from cli_checks import run_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module(["llava_twist.serve.cli", *args], cwd=ROOT)


def test_cli_json_and_saved_image(tiny_llava, tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGB", (160, 90), (30, 120, 200)).save(image)
    out = tmp_path / "drawn" / "boxes.png"
    proc = run_cli("--model-path", str(tiny_llava), "--image-file", str(image), "--query",
                   "Where is the red circle? Answer step by step.", "--max-new-tokens", "12", "--device", "cpu",
                   "--json", "--save-image", str(out))
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["route"] == "frozen" and 0 < payload["router_prob"] < 0.5 and not payload["route_forced"]
    assert payload["image_size"] == [160, 90] and payload["box_frame"] == "padded"
    assert payload["text"] and payload["miss_reason"]  # an untrained model writes no box: a miss with a reason
    assert payload["miss_reason"] in payload["problems"]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (160, 90)


def test_cli_streams_and_reports_in_text_mode(tiny_llava, tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (200, 20, 20)).save(image)
    proc = run_cli("--model-path", str(tiny_llava), "--image-file", str(image), "--query", "What is this?",
                   "--max-new-tokens", "6", "--device", "cpu", "--route", "grounding")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ASSISTANT: ")
    assert "route: grounding (forced)" in proc.stdout and "miss: " in proc.stdout


def test_cli_errors_are_messages(tiny_llava, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    proc = run_cli("--model-path", str(tiny_llava), "--image-file", str(missing), "--query", "q")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: image file {missing}: not found"
    image = tmp_path / "scene.png"
    Image.new("RGB", (32, 32)).save(image)
    assert cli.main(["--model-path", str(tmp_path / "no-model"), "--image-file", str(image), "--query", "q"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not an image")
    assert cli.main(["--model-path", str(tiny_llava), "--image-file", str(tmp_path / "bad.png"), "--query", "q"]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err


def test_report_and_drawing_of_a_chain():
    text = "Step 1: Two circles [0.10, 0.30, 0.30, 0.60], [0.50, 0.30, 0.70, 0.60].\nStep 2: The left one.\n" \
           "Answer: [0.10, 0.30, 0.30, 0.60]"
    result = result_from_text(text, (200, 100), "padded", route="grounding", router_prob=0.91)
    report = cli.format_result(result)
    assert "route: grounding (router p(grounding)=0.910)" in report
    assert "box [20.0, 10.0, 60.0, 70.0]" in report and "box [100.0, 10.0, 140.0, 70.0]" in report
    assert "miss:" not in report
    drawn = draw_boxes(Image.new("RGB", (200, 100), (255, 255, 255)), result)
    assert drawn.getpixel((20, 40)) != (255, 255, 255) and drawn.getpixel((100, 40)) != drawn.getpixel((20, 40))
    assert drawn.getpixel((180, 95)) == (255, 255, 255)
    bad = cli.format_result(result_from_text("Step 1: [0.1, 0.2", (200, 100)))
    assert "miss: no answer line" in bad and "note: unterminated box" in bad

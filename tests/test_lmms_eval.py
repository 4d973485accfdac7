"""lmms-eval itself (``python -m lmms_eval``, offline) on the released tiny base and a TWIST made from it: the
``llava_twist`` model (registered by the entry point setup.py declares, and by ``LMMS_EVAL_PLUGINS``), the offline
tasks, the routes in ``--log_samples``, and REC scores equal to ``eval_refexp --protocol lmms-eval``.

lmms-eval exits 0 when an evaluation fails, so every run is checked by the files it writes. The runs are slow (a
process each, about 40 s on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_checks import REPO, run_module, run_process
from PIL import Image, ImageDraw

from llava_twist.eval.common import read_jsonl
from llava_twist.lmms import LMMS_EVAL
from llava_twist.lmms.samples import sample_route

BASE = REPO / "playground" / "models" / "tiny-llava-v1.5"  # its config names its vision tower from the repo root
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 210, 40)}
ASKED = ["What colour is the square?", "Which colour does the box have?", "What is the colour of the shape?",
         "Name the colour of the square."]  # prompts that differ, so the router tells them apart
MAX_NEW_TOKENS = {"rec": 24, "understanding": 12}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Scenes of one coloured square each, REC and short-answer questions about them, and the tasks reading them."""
    root = tmp_path_factory.mktemp("lmms-data")
    (root / "images").mkdir()
    rec, understanding = [], []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        w, h = 64 + 16 * i, 48 + 8 * i
        box = [6.0 + 5 * i, 4.0 + 3 * i, 30.0 + 7 * i, 26.0 + 5 * i]
        image = Image.new("RGB", (w, h), (128, 128, 128))
        ImageDraw.Draw(image).rectangle(box, fill=rgb)
        image.save(root / "images" / f"{i}.png")
        common = {"image": f"images/{i}.png", "width": w, "height": h}
        rec.append({"question_id": f"r{i}", **common, "expression": f"the {name} square", "bbox_xyxy_px": box})
        understanding.append({"question_id": f"u{i}", **common, "answer": name,
                              "text": f"{ASKED[i]} Answer the question using a single word or phrase."})
    files = {"rec": root / "rec.jsonl", "understanding": root / "understanding.jsonl"}
    for kind, rows in (("rec", rec), ("understanding", understanding)):
        files[kind].write_text("".join(json.dumps(r) + "\n" for r in rows))
        proc = run_module(["llava_twist.lmms.tasks", "--kind", kind, "--question-file", files[kind],
                           "--image-folder", root, "--out", root / "tasks", "--task", f"t_{kind}"])
        assert proc.returncode == 0, proc.stderr
        # short answers, and settings that differ by task: lmms-eval's Llava batches requests of equal settings
        # across tasks, llava_twist one task at a time, so equal settings would batch them differently
        with open(root / "tasks" / f"t_{kind}.yaml", "a") as f:
            f.write(f"generation_kwargs:\n  until: ['ASSISTANT:']\n  max_new_tokens: {MAX_NEW_TOKENS[kind]}\n")
    return {**files, "tasks": root / "tasks", "root": root}


@pytest.fixture(scope="module")
def twist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full TWIST checkpoint and its grounding-only delta, from the released base: grounding experts moved away
    from the frozen ones (so the routes answer differently) and a random router (so prompts take both routes)."""
    from llava_twist.model.builder import convert_llava_to_twist, save_twist_checkpoint, save_twist_delta
    from llava_twist.model.checks import load_tokenizer

    out = tmp_path_factory.mktemp("lmms-twist")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        model = convert_llava_to_twist(str(BASE), twist_mix="fixed", twist_mix_init=0.0)  # the expert alone
        tokenizer = load_tokenizer(str(BASE))
    finally:
        os.chdir(cwd)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("model.layers.") and ".twist_" in name and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=gen) * param.std() * 2)
        router = model.get_model().twist_router.net[-1]
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.5)
        router.bias.zero_()
    save_twist_checkpoint(model, out / "twist", tokenizer)
    save_twist_delta(model, out / "delta")
    return {"full": out / "twist", "delta": out / "delta"}


def lmms_eval(out: Path, model: str, model_args: str, tasks: str, include: Path | None,
              env: dict[str, str] | None = None, batch_size: int = 1) -> subprocess.CompletedProcess[str]:
    argv = ["lmms_eval", "--model", model, "--model_args", f"{model_args},device=cpu,device_map=auto",
            "--batch_size", str(batch_size), "--tasks", tasks, "--log_samples", "--output_path", out]
    argv += ["--include_path", include] if include else []
    cache = {"HF_DATASETS_CACHE": str(out / "hf-datasets"), "HF_DATASETS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"}
    return run_process(argv, cwd=REPO, env={**cache, **(env or {})}, timeout=600)


def outputs(out: Path, proc: subprocess.CompletedProcess[str]) -> tuple[dict, dict[str, list[dict]]]:
    """The results JSON and each task's logged samples (lmms-eval exits 0 on failure: the files are the test)."""
    found = sorted(out.rglob("*_results.json"))
    assert len(found) == 1, proc.stderr[-4000:]
    samples = {p.name.split("_samples_", 1)[1].removesuffix(".jsonl"): read_jsonl(str(p))
               for p in found[0].parent.glob("*_samples_*.jsonl")}
    return json.loads(found[0].read_text()), samples


def responses(samples: list[dict]) -> list[str]:
    return [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def entry_point(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's metadata (``setup.py egg_info``), first on the path: lmms-eval finds ``llava_twist`` through
    the entry point setup.py declares, as after ``make install``."""
    out = tmp_path_factory.mktemp("egg-info")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lmms_eval.models" in (out / "llava_twist.egg-info" / "entry_points.txt").read_text()
    return out


@pytest.fixture(scope="module")
def runs(data, twist, entry_point, tmp_path_factory) -> dict[str, tuple[dict, dict[str, list[dict]]]]:
    tmp = tmp_path_factory.mktemp("lmms-runs")
    tasks = "t_understanding,t_rec"
    env = {"PYTHONPATH": f"{entry_point}{os.pathsep}{REPO}"}
    specs = {
        "base": ("llava", f"pretrained={BASE}"),
        "frozen": ("llava_twist", f"pretrained={twist['full']},twist_route=frozen"),
        "auto": ("llava_twist", f"pretrained={twist['full']},twist_route=auto"),
        "auto-one-by-one": ("llava_twist", f"pretrained={twist['full']},twist_route=auto"),
    }
    done = {"folder": tmp}
    for name, (model, args) in specs.items():
        # batches of 3 of 4 prompts: mixed routes in one generate, and lmms-eval's own batching (which pads on the
        # right, as LLaVA's builder leaves it) on both sides of every comparison
        proc = lmms_eval(tmp / name, model, args, tasks, data["tasks"], env, batch_size=1 if "one" in name else 3)
        done[name] = outputs(tmp / name, proc)
    return done


@pytest.mark.slow
def test_frozen_route_answers_as_lmms_evals_llava_on_the_base(runs) -> None:
    _, base = runs["base"]
    _, frozen = runs["frozen"]
    for task in ("t_understanding", "t_rec"):
        assert responses(frozen[task]) == responses(base[task])
        assert {sample_route(s)[0] for s in frozen[task]} == {"frozen"}
    assert any(r.strip() for r in responses(base["t_understanding"]) + responses(base["t_rec"]))
    assert {sample_route(s) for s in base["t_rec"]} == {(None, None)}


@pytest.mark.slow
def test_auto_route_logs_each_samples_route_and_frozen_ones_answer_as_the_base(runs) -> None:
    _, base = runs["base"]
    _, auto = runs["auto"]
    seen = set()
    for task in ("t_understanding", "t_rec"):
        by_id = {s["doc_id"]: s for s in base[task]}
        for sample in auto[task]:
            route, prob = sample_route(sample)
            assert 0.0 <= prob <= 1.0 and route == ("grounding" if prob > 0.5 else "frozen")
            seen.add(route)
            if route == "frozen":
                assert sample["filtered_resps"] == by_id[sample["doc_id"]]["filtered_resps"]
    assert seen == {"frozen", "grounding"}  # the random router splits the prompts, so both branches ran
    grounded = [s for task in auto for s in auto[task] if sample_route(s)[0] == "grounding"]
    base_text = {(s["doc_id"], s["target"]): s["filtered_resps"] for task in base for s in base[task]}
    assert any(s["filtered_resps"] != base_text[(s["doc_id"], s["target"])] for s in grounded)


@pytest.mark.slow
def test_each_sample_gets_its_own_prompts_route_in_a_batch(runs) -> None:
    """Routes logged from batches of 3 are those of the same prompts asked one by one (a route given to the wrong
    sample of a batch would carry another prompt's probability)."""
    _, batched = runs["auto"]
    _, single = runs["auto-one-by-one"]
    for task in ("t_understanding", "t_rec"):
        alone = {s["doc_id"]: sample_route(s) for s in single[task]}
        probs = [sample_route(s)[1] for s in batched[task]]
        assert max(probs) - min(probs) > 0.05  # distinct enough that a swap would show
        for sample in batched[task]:
            route, prob = sample_route(sample)
            assert route == alone[sample["doc_id"]][0] and prob == pytest.approx(alone[sample["doc_id"]][1], abs=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["base", "auto"])
def test_rec_scores_equal_eval_refexp_lmms_eval_protocol(runs, data, run, tmp_path) -> None:
    results, samples = runs[run]
    answers = tmp_path / "answers.jsonl"
    samples_file = tmp_path / "samples.jsonl"
    samples_file.write_text("".join(json.dumps(s) + "\n" for s in samples["t_rec"]))
    proc = run_module(["llava_twist.lmms.samples", "--samples", samples_file, "--question-file", data["rec"],
                       "--answers-file", answers])
    assert proc.returncode == 0, proc.stderr
    texts = [a["text"] for a in read_jsonl(str(answers))]
    assert any("[" in t for t in texts), texts  # answers with boxes, so the scores are not all zero by parse
    result_file = tmp_path / "result.json"
    proc = run_module(["llava_twist.eval.eval_refexp", "--protocol", "lmms-eval", "--question-file", data["rec"],
                       "--answers-file", answers, "--result-file", result_file])
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(result_file.read_text())["metrics"]
    theirs = results["results"]["t_rec"]
    assert theirs["refcoco_ACC@0.5,none"] == ours["acc@0.5"]
    assert theirs["refcoco_IoU,none"] == pytest.approx(ours["mean_iou"], abs=1e-12)


@pytest.mark.slow
def test_summary_tables_base_vs_twist_from_lmms_eval_results(runs, tmp_path) -> None:
    proc = run_module(["llava_twist.eval.summary", runs["folder"], "--out", tmp_path / "summary"])
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "summary.md").read_text().split("## lmms-eval: base vs TWIST", 1)[1]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| t_")]
    auto, frozen = "llava_twist: twist, twist_route=auto", "llava_twist: twist, twist_route=frozen"
    assert sorted((r[0].strip("| "), r[1], r[4]) for r in rows) == [  # the auto runs of both batch sizes
        ("t_rec", "refcoco_ACC@0.5", auto), ("t_rec", "refcoco_ACC@0.5", auto), ("t_rec", "refcoco_ACC@0.5", frozen),
        ("t_understanding", "exact_match", auto), ("t_understanding", "exact_match", auto),
        ("t_understanding", "exact_match", frozen),
    ]
    for task in ("t_rec", "t_understanding"):
        metric = "refcoco_ACC@0.5" if task == "t_rec" else "exact_match"
        base = runs["base"][0]["results"][task][f"{metric},none"]
        frozen = next(r for r in rows if r[0].strip("| ") == task and "frozen" in r[4])
        assert float(frozen[3]) == pytest.approx(base, abs=1e-4) and float(frozen[6]) == 0.0


@pytest.mark.slow
def test_bad_model_args_get_one_line_from_lmms_eval(twist, data, tmp_path) -> None:
    """Through lmms-eval itself, the model registered by ``LMMS_EVAL_PLUGINS`` (no entry point on the path)."""
    proc = lmms_eval(tmp_path / "out", "llava_twist", f"pretrained={twist['full']},twist_route=sideways", "t_rec",
                     data["tasks"], {"LMMS_EVAL_PLUGINS": "llava_twist.lmms"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == ["error: --model llava_twist: twist_route='sideways': expected one of auto, frozen, grounding"]
    assert not list((tmp_path / "out").rglob("*_results.json"))


@pytest.mark.slow
@pytest.mark.parametrize(("model_args", "pieces"), [
    ("pretrained={missing}", ["cannot load", "pretrained", "missing-checkpoint: no such folder"]),
    ("pretrained={delta}", ["grounding-only TWIST delta", "model_base"]),
    ("pretrained={full},temperature=0.7", ["unknown model_args temperature"]),
])
def test_bad_model_args_get_one_line(twist, tmp_path, capsys, model_args, pieces) -> None:
    """The same refusals, constructing the model as lmms-eval does (``create_from_arg_string``)."""
    from llava_twist.lmms.models.llava_twist import LlavaTwist

    args = model_args.format(full=twist["full"], delta=twist["delta"], missing=tmp_path / "missing-checkpoint")
    with pytest.raises(SystemExit) as exited:
        LlavaTwist.create_from_arg_string(f"{args},device=cpu,device_map=auto")
    err = capsys.readouterr().err
    assert exited.value.code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --model llava_twist: "), err
    assert all(p in lines[0] for p in pieces), lines[0]


def test_without_lmms_eval_the_check_names_the_extra(monkeypatch, capsys) -> None:
    from llava_twist.lmms.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmms_eval" else real(name, *a))
    assert main([]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and '".[lmms]"' in lines[0] and f"--no-deps {LMMS_EVAL}" in lines[0], lines
    monkeypatch.undo()
    assert main([]) == 0 and LMMS_EVAL.replace("==", " ") in capsys.readouterr().out

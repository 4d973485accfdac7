"""``make demo`` (``python -m llava_twist.demo``) end to end at the ``ci`` budget: every stage runs and is
cached on a rerun, the report has its structure, and TWIST's answers to understanding questions are the
base's (the property that holds at any budget). Plus the stage cache and failure reports on toy stages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llava_twist.demo.pipeline import STAMP, Context, Layout, Stage, StageError, run_stage
from llava_twist.demo.recipe import BOX_LESSON, get_recipe
from llava_twist.demo.stages import build_stages
from llava_twist.eval.answer_loss import MASS_KINDS

RECIPE = get_recipe("ci")
STAGES = [s.name for s in build_stages(RECIPE)]
TWIST = [v.stage for v in RECIPE.twist_variants]
MODELS = ["base", "full-ft", "lora", *TWIST]
ROW_LABELS = {"base": "base (LLaVA-1.5)", "full-ft": "full FT", "lora": "LoRA",
              **{t: f"TWIST ({t.removeprefix('twist-')})" for t in TWIST}}


def run_demo_cli(out: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llava_twist.demo", "--profile", "ci", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc, seconds


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    first, first_s = run_demo_cli(out)
    second, second_s = run_demo_cli(out)
    return {"out": out, "first": first, "first_s": first_s, "second": second, "second_s": second_s,
            "results": json.loads((out / "results.json").read_text())}


def stage_lines(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^\[([\w-]+)\] (.+)$", stdout, flags=re.M))


def answers(out: Path, model: str) -> dict[str, dict[str, Any]]:
    path = out / "work" / "eval" / "models" / model / "answers.jsonl"
    return {a["question_id"]: a for a in map(json.loads, path.read_text().splitlines())}


def test_every_stage_ran_once_and_wrote_its_stamp(demo: dict[str, Any]) -> None:
    lines = stage_lines(demo["first"].stdout)
    assert list(lines) == STAGES
    assert all(re.fullmatch(r"done in \d+\.\d s", v) for v in lines.values()), lines
    out = demo["out"]
    for stage in build_stages(RECIPE):
        stamp = json.loads((stage.folder(Layout(out)) / STAMP).read_text())
        assert stamp["stage"] == stage.name and stamp["profile"] == "ci"
        assert stamp["seconds"] > 0 and set(stamp["upstream"]) == set(stage.deps)
        assert (out / "logs" / f"{stage.name}.log").stat().st_size > 0
    last = demo["first"].stdout.strip().splitlines()[-1]
    assert str(out / "report.md") in last and "playground" in last


def test_warmup_lessons_chain_from_the_tiny_model_to_the_base(demo: dict[str, Any]) -> None:
    models, data, logs = (demo["out"] / "work" / "models", demo["out"] / "work" / "data", demo["out"] / "logs")
    assert [w.name for w in RECIPE.warmups] == ["look", "boxes"]
    start = models / "tiny"
    for lesson in RECIPE.warmups:
        state = json.loads((models / lesson.stage / "trainer_state.json").read_text())
        assert state["global_step"] == lesson.train.steps
        records = json.loads((data / lesson.stage / "train.json").read_text())
        assert len(records) == lesson.data.num
        log = (logs / f"{lesson.stage}.log").read_text()
        assert re.search(rf"--model_name_or_path {re.escape(str(start))}\b", log), lesson.stage
        start = models / lesson.stage
    colour, boxes = (json.loads((data / w.stage / "train.json").read_text()) for w in RECIPE.warmups)
    assert {r["task"] for r in colour} == {"understanding"}
    assert {r["task"] for r in boxes} == {"grounding"}
    assert all(re.search(r"\[[\d.]+, [\d.]+, [\d.]+, [\d.]+\]", r["conversations"][-1]["value"]) for r in boxes)
    assert re.search(rf"--model_name_or_path {re.escape(str(start))}\b", (logs / "base.log").read_text())


def test_second_run_is_all_cached_and_fast(demo: dict[str, Any]) -> None:
    lines = stage_lines(demo["second"].stdout)
    assert lines == dict.fromkeys(STAGES, "cached")
    assert f"0 of {len(STAGES)} stages ran" in demo["second"].stdout
    assert demo["second_s"] < 60, demo["second_s"]
    print(f"\nci demo: first run {demo['first_s']:.1f} s, cached rerun {demo['second_s']:.1f} s")


def test_report_has_the_table_the_checks_and_the_settings(demo: dict[str, Any]) -> None:
    report = (demo["out"] / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | Acc@0.5 | simple | hard | mean IoU |")
    for model in MODELS:
        assert any(line.startswith(f"| {ROW_LABELS[model]} |") for line in table), model
    checks = report.split("## What it must show", 1)[1].split("##", 1)[0]
    for twist in TWIST:
        marks = re.findall(rf"^- \*\*(PASS|FAIL|n/a)\*\* {re.escape(ROW_LABELS[twist])}: (.+)$", checks, flags=re.M)
        assert len(marks) == 4, checks
    assert "identical to the base" in checks and "router" in checks and "Forgetting" in checks
    for section in ("## Held-out scenes", "## Settings", "## Time per stage"):
        assert section in report
    assert "![grid](grid.png)" in report
    tower = json.loads((demo["out"] / "work" / "models" / "tiny" / "clip-vision-tower" / "dense_pretraining.json")
                       .read_text())["after"]
    assert f"colour {tower['colour_acc'] * 100:.1f}%" in report.split("Vision tower (frozen", 1)[1].split("\n", 1)[0]
    assert "| vision tower | dense pretraining on 64 scenes" in report
    assert "| base warm-up: look | 4 steps x batch 8, lr 0.002, projector lr 0.01" in report
    assert "from the warmed-up model |" in report
    assert "| base warm-up: boxes | 4 steps x batch 8" in report and "(region:1; refexp attribute:1)" in report


def test_grid_is_a_png(demo: dict[str, Any]) -> None:
    path = demo["out"] / "grid.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 400 and im.size[1] > 200


def test_results_hold_every_metric(demo: dict[str, Any]) -> None:
    results = demo["results"]
    assert results["profile"] == "ci" and set(results["models"]) == set(MODELS)
    assert results["best_twist"] in TWIST
    assert results["questions"]["refexp"] > 0 and results["questions"]["vqa"] > 0
    for name, m in results["models"].items():
        for level in ("simple", "hard"):
            assert m["refexp"][level]["n"] >= 0
        assert 0.0 <= m["refexp"]["acc@0.5"] <= 1.0 and 0.0 <= m["refexp"]["mean_iou"] <= 1.0
        assert 0.0 <= m["understanding"]["accuracy"] <= 1.0
        by_type = m["understanding"]["by_type"]
        assert "other" not in by_type and sum(t["n"] for t in by_type.values()) == m["understanding"]["n"]
        right = sum(t["accuracy"] * t["n"] for t in by_type.values())
        assert right == pytest.approx(m["understanding"]["accuracy"] * m["understanding"]["n"])
        assert m["trainable_params"] > 0
        assert (name == "base") == ("retention" not in m)
        assert (name in TWIST) == ("router" in m)
    for twist in TWIST:
        router = results["models"][twist]["router"]
        assert router["n"] == sum(results["questions"].values()) and 0.0 <= router["accuracy"] <= 1.0
    assert len(results["checks"]) == 4 * len(TWIST)
    reliance = results["image_reliance"]
    assert reliance["records"] >= 2 and reliance["loss_own_images"] > 0 and reliance["loss_shuffled_images"] > 0
    assert "Does the base use the image?" in (demo["out"] / "report.md").read_text()
    base_types = results["models"]["base"]["understanding"]["by_type"]
    assert "Understanding by question type (held-out):" in (demo["out"] / "report.md").read_text()
    assert f"| {' | '.join(sorted(base_types))} |" in (demo["out"] / "report.md").read_text()
    region, one_shot = results["base_one_shot"]["region"], results["base_one_shot"]["refexp"]
    assert region["n"] > 0 and 0.0 <= region["acc@0.5"] <= 1.0 and 0.0 <= region["parse_failure_rate"] <= 1.0
    report = (demo["out"] / "report.md").read_text()
    assert f"Does the base ground? On {region['n']} held-out one-shot box prompts" in report
    # the base is asked the grounding runs' own held-out expressions one-shot too, and the table shows both
    assert one_shot["n"] == results["models"]["base"]["refexp"]["n"] and "predictions" not in one_shot
    assert results["models"]["base"]["one_shot"]["acc@0.5"] == one_shot["acc@0.5"]
    assert "| base (LLaVA-1.5), one-shot prompt |" in report and "| base (LLaVA-1.5), step-by-step prompt |" in report
    assert set(results["stages"]) == set(STAGES) - {"report"}


def test_misses_account_for_every_held_out_expression_as_the_scorer_does(demo: dict[str, Any]) -> None:
    results = demo["results"]
    base = results["models"]["base"]
    for misses, refexp in [(m["misses"], m["refexp"]) for m in results["models"].values()] + [
            (base["one_shot"]["misses"], base["one_shot"])]:
        assert misses["n"] == refexp["n"] == sum(misses["answer"].values())
        assert misses["answer"]["right"] == round(refexp["acc@0.5"] * refexp["n"])  # the scorer's own count
        steps = misses["steps"]
        assert steps["boxes"] >= steps["on_an_object"] >= steps["on_the_named_object"] >= 0
    assert "## How the chains miss" in (demo["out"] / "report.md").read_text()


def test_chain_loss_is_split_into_coordinate_and_text_tokens_for_every_model(demo: dict[str, Any]) -> None:
    losses = {name: m["chain_loss"] for name, m in demo["results"]["models"].items()}
    assert len({json.dumps(r["tokens"]) for r in losses.values()}) == 1  # same records, same tokenizer
    first = next(iter(losses.values()))
    assert first["records"] > 0 and first["tokens"]["coordinate"] > 0 and first["tokens"]["text"] > 0
    section = (demo["out"] / "report.md").read_text().split("## Where the loss sits", 1)[1].split("##", 1)[0]
    assert f"on {first['records']} held-out chains ({first['tokens']['coordinate']} box-coordinate tokens" in section
    assert "over the 101 coordinate tokens costs 4.62 nats" in section
    def pooled(r: dict[str, Any], a: str, b: str) -> float:
        mean, count = r["loss_per_token"], r["tokens"]
        return (mean[a] * count[a] + mean[b] * count[b]) / (count[a] + count[b])

    for name, r in losses.items():
        count = r["tokens"]
        assert count["x1"] + count["y1"] + count["x2"] + count["y2"] == count["coordinate"]
        values = [r["loss_per_token"]["coordinate"], pooled(r, "x1", "y1"), pooled(r, "x2", "y2"),
                  r["loss_per_token"]["text"]]
        mass = r["coordinate_mass"]  # the ci model has one token per coordinate
        corner = mass["first_corner"]
        assert mass["all"]["tokens"] == count["coordinate"] and corner["tokens"] == count["x1"] + count["y1"]
        assert sum(corner[k] for k in MASS_KINDS) == pytest.approx(1.0)
        split = " / ".join(f"{corner[k]:.2f}" for k in MASS_KINDS[:3])  # value, within 0.02, farther
        assert "| " + " | ".join([ROW_LABELS[name], *(f"{v:.3f}" for v in values), split]) + " |" in section


def test_twist_answers_understanding_questions_exactly_as_the_base(demo: dict[str, Any]) -> None:
    """On the frozen route TWIST runs the base's computation: same text, at any training budget."""
    out = demo["out"]
    base = answers(out, "base")
    vqa = [json.loads(line)["question_id"] for line in
           (out / "work" / "eval" / "questions" / "vqa.jsonl").read_text().splitlines()]
    for twist in TWIST:
        got = answers(out, twist)
        frozen = [q for q in vqa if got[q]["metadata"]["route"] == "frozen"]
        assert frozen, f"{twist}: the router sent every understanding question down the grounding route"
        assert [got[q]["text"] for q in frozen] == [base[q]["text"] for q in frozen]
        retention = demo["results"]["models"][twist]["retention"]
        assert retention["identical_rate_frozen_route"] == 1.0
        if len(frozen) == len(vqa):
            assert retention["identical_rate"] == 1.0


def test_router_output_is_recorded(demo: dict[str, Any]) -> None:
    for twist in TWIST:
        for a in answers(demo["out"], twist).values():
            meta = a["metadata"]
            assert meta["route"] in ("frozen", "grounding") and meta["route_forced"] is False
            assert 0.0 <= meta["router_prob"] <= 1.0
    for model in ("base", "full-ft", "lora"):
        assert all(a["metadata"]["route"] is None for a in answers(demo["out"], model).values())


def test_playground_json_points_at_a_loadable_twist_delta(demo: dict[str, Any]) -> None:
    from llava_twist.model.builder import DELTA_WEIGHTS, load_pretrained_model
    from playground.models import find_demo_model

    source = find_demo_model(demo["out"])
    assert source is not None and not Path(json.loads((demo["out"] / "playground.json").read_text())[
        "model_path"]).is_absolute()
    assert Path(source.model_path, DELTA_WEIGHTS).is_file() and Path(source.model_base, "config.json").is_file()
    assert Path(source.model_path).name == demo["results"]["best_twist"]
    # the playground's examples: the first held-out referring expressions of the model's own world, in order
    examples = json.loads((Path(source.examples) / "examples.json").read_text())
    held_out = [r for r in json.loads((demo["out"] / "work" / "data" / "grounding" / "test.json").read_text())
                if r["kind"] == "refexp"]
    assert [e["image"] for e in examples] == [Path(r["image"]).name for r in held_out[:len(examples)]]
    assert all((Path(source.examples) / e["image"]).is_file() for e in examples) and examples
    assert f"its examples are the first {len(examples)} held-out referring expressions" in (
        demo["out"] / "report.md").read_text()
    _, model, _, _ = load_pretrained_model(source.model_path, source.model_base, device="cpu")
    assert model.config.model_type == "llava_twist"


# ---------------------------------------------------------------- the stage cache on toy stages


class ToyRecipe:
    profile, threads, device = "toy", 1, "cpu"

    def __init__(self, **settings: int) -> None:
        self.settings = settings

    def stage_config(self, stage: str) -> dict[str, Any]:
        return {"value": self.settings.get(stage, 0)}


def toy_stages(calls: list[str]) -> list[Stage]:
    def body(ctx: Context) -> dict[str, Any]:
        calls.append(ctx.stage)
        (ctx.folder / "out.txt").write_text(ctx.stage)
        return {}

    return [Stage("a", lambda lay: lay.work / "a", (), body), Stage("b", lambda lay: lay.work / "b", ("a",), body),
            Stage("c", lambda lay: lay.work / "c", (), body)]


def run_all(recipe: Any, layout: Layout, calls: list[str], force: str = "") -> list[str]:
    calls.clear()
    stamps: dict[str, dict[str, Any]] = {}
    for stage in toy_stages(calls):
        stamps[stage.name] = run_stage(stage, recipe, layout, stamps, force=stage.name == force).stamp
    return list(calls)


def test_changed_settings_redo_the_stage_and_everything_downstream(tmp_path: Path) -> None:
    layout, calls = Layout(tmp_path), []
    assert run_all(ToyRecipe(), layout, calls) == ["a", "b", "c"]
    assert run_all(ToyRecipe(), layout, calls) == []
    assert run_all(ToyRecipe(a=1), layout, calls) == ["a", "b"]
    assert run_all(ToyRecipe(a=1, c=2), layout, calls) == ["c"]
    assert run_all(ToyRecipe(a=1, c=2), layout, calls, force="a") == ["a", "b"]
    (tmp_path / "work" / "b" / STAMP).unlink()
    assert run_all(ToyRecipe(a=1, c=2), layout, calls) == ["b"]


def test_warmup_lessons_are_stages_in_order_and_optional() -> None:
    deps = {s.name: s.deps for s in build_stages(RECIPE)}
    assert STAGES[2:5] == ["warmup-look", "warmup-boxes", "base"]
    assert deps["warmup-look"] == ("model", "data") and deps["warmup-boxes"] == ("warmup-look", "data")
    assert deps["base"] == ("warmup-boxes", "data")
    assert RECIPE.stage_config("warmup-boxes")["train"] == asdict(RECIPE.warmups[1].train)
    bare = replace(RECIPE, warmups=())
    assert {s.name: s.deps for s in build_stages(bare)}["base"] == ("model", "data")
    assert "warmup-look" not in [s.name for s in build_stages(bare)]
    assert replace(RECIPE, warmups=RECIPE.warmups[:1]).stage_config("data") != RECIPE.stage_config("data")


def test_full_starts_from_the_released_base_and_ci_trains_its_own() -> None:
    full, ci = get_recipe("full"), get_recipe("ci")
    assert full.shipped_base and not ci.shipped_base
    assert [w.name for w in full.warmups] == ["look", "boxes"]
    assert BOX_LESSON.data.kinds == "region:1" and BOX_LESSON.data.max_objects == 1
    assert full.grounding_data.chain_style == "terse" and full.base_data.grid == full.grounding_data.grid == 4
    # the base hash covers what makes the base's weights, and nothing the grounding runs read
    assert replace(full, full_ft=replace(full.full_ft, steps=1)).base_hash() == full.base_hash()
    assert replace(full, base=replace(full.base, steps=1)).base_hash() != full.base_hash()
    assert replace(full, base_data=replace(full.base_data, num=1)).base_hash() != full.base_hash()


def test_a_failed_command_names_the_stage_and_quotes_its_log(tmp_path: Path) -> None:
    def body(ctx: Context) -> None:
        ctx.run([sys.executable, "-c", "print('\\n'.join(f'line {i}' for i in range(50))); raise SystemExit(3)"])

    stage = Stage("broken", lambda lay: lay.work / "broken", (), body)
    with pytest.raises(StageError) as info:
        run_stage(stage, ToyRecipe(), Layout(tmp_path), {})
    message = str(info.value)
    assert "stage 'broken' failed" in message and "exited with status 3" in message
    assert str(tmp_path / "logs" / "broken.log") in message
    assert "line 49" in message and "line 19" not in message
    assert not (tmp_path / "work" / "broken" / STAMP).exists()


# ---------------------------------------------------------------- where the runs run: CPU (fp32) or CUDA (bf16)


def launched_args(script: Path, env: dict[str, str], extra: list[str], tmp_path: Path) -> list[str]:
    """The arguments a TWIST launcher hands the trainer, read from a stand-in ``deepspeed`` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    fake = bin_dir / "deepspeed"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    run_env = {**os.environ, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    if "DEEPSPEED" in env:
        run_env["DEEPSPEED"] = str(fake)
    subprocess.run(["bash", str(script), *extra], env=run_env, check=True, timeout=60)
    argv = json.loads(record.read_text())
    return argv[argv.index(next(a for a in argv if a.endswith("train_twist.py"))) + 1:]


def test_gpu_profile_runs_the_same_pipeline_larger_in_bf16_through_the_users_launcher(tmp_path: Path) -> None:
    from llava.train import train as llava_train
    from transformers import HfArgumentParser

    from llava_twist.demo.stages import LLAVA_DS_CONFIG, TRAIN_LLAVA, llava_train_args, twist_launch
    from llava_twist.train.arguments import DataArguments, ModelArguments, TrainingArguments, TwistArguments

    full, gpu = get_recipe("full"), get_recipe("gpu")
    assert (full.device, gpu.device) == ("cpu", "cuda") and gpu.shipped_base is None
    assert gpu.model.hidden_size > full.model.hidden_size and gpu.twist.steps > full.twist.steps
    assert gpu.grounding_data.grid == full.grounding_data.grid and gpu.base_hash() != full.base_hash()
    # where a run runs changes its results (a stage's stamp), not what the released base is made of
    assert replace(full, device="cuda").base_hash() == full.base_hash()
    assert replace(full, device="cuda").stage_config("full-ft") != full.stage_config("full-ft")

    layout = Layout(tmp_path / "demo")
    layout.model("base").mkdir(parents=True)
    (layout.model("base") / "config.json").write_text(json.dumps({"mm_vision_tower": "/towers/tiny-clip"}))
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, TwistArguments))
    llava_parser = HfArgumentParser((llava_train.ModelArguments, llava_train.DataArguments,
                                     llava_train.TrainingArguments))
    for recipe, script_name, bf16 in ((gpu, "finetune_twist.sh", True), (full, "finetune_twist_cpu.sh", False)):
        work = tmp_path / recipe.profile
        work.mkdir()
        script, env, extra = twist_launch(recipe, layout, recipe.twist_variants[0], work / "out", sys.executable)
        assert script.name == script_name
        args, unknown = parser.parse_known_args(launched_args(script, env, extra, work))
        assert unknown == []  # every flag is one the trainer knows
        assert args.bf16 is bf16 and args.max_steps == recipe.twist.steps and args.twist_layers == "all"
        assert args.per_device_train_batch_size * recipe.twist_nproc == recipe.twist.batch
        assert args.twist_router_lr == 5e-2 and args.gradient_checkpointing is False  # the recipe's, not the script's
        assert args.model_name_or_path == str(layout.model("base")) and args.report_to == ["none"]
        ctx = Context(recipe, layout, "full-ft", work, {})
        llava = llava_train_args(ctx, layout.model("base"), work / "d.json", work, work / "o", recipe.full_ft)
        if bf16:  # LLaVA's trainer under DeepSpeed (fp32 master weights), the script path its launcher runs
            assert Path(llava[0]).name == "deepspeed" and Path(llava[3]) == TRAIN_LLAVA and TRAIN_LLAVA.is_file()
            trainer_argv = llava[4:]
        else:
            assert llava[:3] == [sys.executable, "-m", "llava_twist.train.train_llava"]
            trainer_argv = llava[3:]
        args, unknown = llava_parser.parse_known_args(trainer_argv)
        assert unknown == [] and args.bf16 is bf16 and args.max_steps == recipe.full_ft.steps
        assert args.deepspeed == (str(LLAVA_DS_CONFIG) if bf16 else None)
        assert ctx.env().get("CUDA_VISIBLE_DEVICES") == (None if bf16 else "")  # a CPU profile never takes a GPU

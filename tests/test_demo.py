"""``make demo`` (``python -m playground.miniature``) end to end at the ``ci`` budget: every stage runs and is
cached on a rerun, the report has its structure, and TWIST's answers to understanding questions are the
base's (the property that holds at any budget). Plus the stage cache and failure reports on toy stages."""

from __future__ import annotations

import json
import math
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

from llava_twist.eval.answer_loss import MASS_KINDS
from llava_twist.serve.inference import DEFAULT_CONV_MODE
from playground.miniature.answering import evaluated_models
from playground.miniature.recipe import BOX_LESSON, VARIANTS, get_recipe
from playground.miniature.runner import STAMP, Context, Layout, Stage, StageError, run_stage
from playground.miniature.stages import build_stages, stage_config

pytestmark = [pytest.mark.slow]

RECIPE = get_recipe("ci")
STAGES = [s.name for s in build_stages(RECIPE)]
TWIST = ["twist", *(f"twist-{v.name}" for v in RECIPE.twist_variants[1:])]
MODELS = ["base", "full-ft", "lora", *TWIST]
# per TWIST: identical answers, router, gain, its significance, against full FT, steps against one-shot; the default
# run also against the one-shot-only variant
CHECKS = {t: 6 + (t == "twist" and any(v.data == "rec" for v in RECIPE.twist_variants)) for t in TWIST}
ROW_LABELS = {"base": "base (LLaVA-1.5)", "full-ft": "full FT", "lora": "LoRA", "twist": "TWIST",
              **{t: f"TWIST ({t.removeprefix('twist-')})" for t in TWIST[1:]}}


@pytest.fixture(scope="module")
def demo(ci_demo: dict[str, Any]) -> dict[str, Any]:
    """The session's ci demo, then a second run of the same command into the same folder (everything cached)."""
    out = ci_demo["out"]
    start = time.perf_counter()
    second = ci_demo["run"](out)
    return {"out": out, "first": ci_demo["proc"], "first_s": ci_demo["seconds"], "second": second,
            "second_s": time.perf_counter() - start, "results": json.loads((out / "results.json").read_text())}


def stage_lines(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^\[([\w-]+)\] (.+)$", stdout, flags=re.M))


def answers(out: Path, model: str, prompt: str) -> dict[str, dict[str, Any]]:
    path = out / "work" / "eval" / "models" / model / prompt / "answers.jsonl"
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
    print(f"\nci demo: first run {demo['first_s']:.1f} s, cached rerun {demo['second_s']:.1f} s")


def test_report_has_the_tables_the_checks_and_the_settings(demo: dict[str, Any]) -> None:
    report = (demo["out"] / "report.md").read_text()
    grounding = report.split("## Grounding (test split)", 1)[1].split("##", 1)[0]
    table = [line for line in grounding.splitlines() if line.startswith("| ")]
    assert table[0] == ("| model | prompt (chosen on dev) | Acc@0.5 | REC prompt | step-by-step prompt | attribute | "
                        "relation | superlative | vs base: points (95% CI), McNemar p |")
    understanding = report.split("## Understanding (what the models keep)", 1)[1].split("##", 1)[0]
    head = "| model | accuracy | identical to base | vs base: points (95% CI), McNemar p | router right |"
    assert head in understanding
    for model in MODELS:
        assert sum(line.startswith(f"| {ROW_LABELS[model]} |") for line in table) == 1, model
        assert f"\n| {ROW_LABELS[model]} |" in understanding, model
    checks = report.split("## What it must show", 1)[1].split("##", 1)[0]
    for twist in TWIST:
        marks = re.findall(rf"^- \*\*(PASS|FAIL|n/a)\*\* {re.escape(ROW_LABELS[twist])}: (.+)$", checks, flags=re.M)
        assert len(marks) == CHECKS[twist], checks
    assert "identical to the base" in checks and "router" in checks and "McNemar p" in checks
    assert "Forgetting (understanding against the base, paired): full FT " in understanding
    for section in ("## Test scenes", "## Files", "## Settings", "## Time per stage"):
        assert section in report
    assert "![grid](grid.png)" in report
    tower = json.loads((demo["out"] / "work" / "models" / "tiny" / "clip-vision-tower" / "dense_pretraining.json")
                       .read_text())["after"]
    assert f"colour {tower['colour_acc'] * 100:.1f}%" in report.split("Vision tower (frozen", 1)[1].split("\n", 1)[0]
    assert "| vision tower | dense pretraining on 64 scenes" in report
    assert "| base warm-up: look | 4 steps x batch 8, lr 0.002, projector lr 0.01" in report
    assert "from the warmed-up model |" in report
    assert "| base warm-up: boxes | 4 steps x batch 8" in report and "(region:1; refexp attribute:1)" in report
    assert "| held-out test | 16 records (refexp:1; refexp attribute:1,relation:4,superlative:1)" in report


def test_grid_is_a_png(demo: dict[str, Any]) -> None:
    path = demo["out"] / "grid.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 400 and im.size[1] > 200


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_question_files_hold_fresh_scenes_of_every_expression_type(demo: dict[str, Any]) -> None:
    qdir, data = demo["out"] / "work" / "eval" / "questions", demo["out"] / "work" / "data"
    sets = {name: read_jsonl(qdir / f"{name}.jsonl") for name in ("refexp-dev", "refexp-test", "understanding")}
    held = RECIPE.heldout
    assert [len(sets["refexp-dev"]), len(sets["refexp-test"]), len(sets["understanding"])] == [
        held.dev.num, held.test.num, held.understanding.num]
    for q in sets["refexp-dev"] + sets["refexp-test"]:
        assert {"question_id", "text", "expression", "bbox_xyxy_px", "width", "height", "box_frame",
                "expression_type"} <= set(q)
        assert (data / q["image"]).is_file()
    for q in sets["understanding"]:
        assert {"question_id", "text", "answer", "question_type"} <= set(q)
    assert {q["expression_type"] for q in sets["refexp-test"]} == {"attribute", "relation", "superlative"}
    # no held-out scene is a training scene: every image differs from every image the base or the grounding runs read
    trained = {(data / folder / "images" / r["image"]).read_bytes() for folder in ("grounding", "base")
               for r in json.loads((data / folder / "train.json").read_text())}
    for name in ("refexp-dev", "refexp-test", "understanding"):
        assert not any((data / q["image"]).read_bytes() in trained for q in sets[name]), name
    assert read_jsonl(qdir / "refexp.jsonl") == sets["refexp-dev"] + sets["refexp-test"]


def test_every_model_answered_every_question_under_each_prompt(demo: dict[str, Any]) -> None:
    qdir = demo["out"] / "work" / "eval" / "questions"
    refexp = [q["question_id"] for q in read_jsonl(qdir / "refexp.jsonl")]
    understanding = [q["question_id"] for q in read_jsonl(qdir / "understanding.jsonl")]
    for model in MODELS:
        for prompt, ids in (("rec", refexp), ("scout", refexp), ("understanding", understanding)):
            got = answers(demo["out"], model, prompt)
            assert sorted(got) == sorted(ids), (model, prompt)
        rec = answers(demo["out"], model, "rec")
        assert all(a["prompt"].startswith("Please provide the bounding box coordinate") for a in rec.values())
        assert all(a["prompt"].endswith("Answer step by step.") for a in answers(demo["out"], model, "scout").values())


def test_results_hold_every_metric(demo: dict[str, Any]) -> None:
    results = demo["results"]
    counts = results["questions"]
    assert results["profile"] == "ci" and set(results["models"]) == set(MODELS)
    assert results["best_twist"] in TWIST
    assert sum(counts["test_by_type"].values()) == counts["test"] == RECIPE.heldout.test.num
    for name, m in results["models"].items():
        for prompt in ("rec", "scout"):
            for split in ("dev", "test"):
                scores = m["refexp"][prompt][split]
                assert scores["n"] == counts[split] and 0.0 <= scores["acc@0.5"] <= 1.0
                assert sum(t["n"] for t in scores["by_type"].values()) == scores["n"]
        dev = {p: m["refexp"][p]["dev"]["acc@0.5"] for p in ("rec", "scout")}
        assert m["prompt"] == ("scout" if dev["scout"] > dev["rec"] else "rec")
        assert m["headline"] == m["refexp"][m["prompt"]]["test"]
        u = m["understanding"]
        by_type = u["by_type"]
        assert "other" not in by_type and sum(t["n"] for t in by_type.values()) == u["n"] == counts["understanding"]
        right = sum(t["accuracy"] * t["n"] for t in by_type.values())
        assert right == pytest.approx(u["accuracy"] * u["n"])
        assert m["trainable_params"] > 0
        assert (name == "base") == ("retention" not in m) == ("vs_base" not in m)
        assert (name in TWIST) == ("router" in m) == ("vs_full_ft" in m)
        if name != "base":
            base = results["models"]["base"]
            assert m["vs_base"]["n"] == counts["test"]
            assert m["vs_base"]["difference"] == pytest.approx(m["headline"]["acc@0.5"] - base["headline"]["acc@0.5"])
            assert m["retention"]["vs_base"]["n"] == counts["understanding"]
            assert m["retention"]["vs_base"]["difference"] == pytest.approx(u["accuracy"] - base["understanding"][
                "accuracy"])
    for twist in TWIST:
        router = results["models"][twist]["router"]
        assert router["n"] == 2 * (counts["dev"] + counts["test"]) + counts["understanding"]
    assert len(results["checks"]) == sum(CHECKS.values())
    assert set(results["stages"]) == set(STAGES) - {"report"}


def test_paired_figures_agree_with_the_answers_counted_by_hand(demo: dict[str, Any]) -> None:
    """McNemar's exact p from the discordant pairs, counted from each model's scored right/wrong lists."""
    metrics = json.loads((demo["out"] / "work" / "eval" / "metrics.json").read_text())["models"]
    base = metrics["base"]["headline"]["correct"]
    for name in MODELS[1:]:
        mine = metrics[name]["headline"]["correct"]
        only_mine = sum(mine[q] and not base[q] for q in base)
        only_base = sum(base[q] and not mine[q] for q in base)
        n, k = only_mine + only_base, min(only_mine, only_base)
        p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
        found = metrics[name]["vs_base"]
        assert (found["only_a"], found["only_b"]) == (only_mine, only_base)
        assert found["mcnemar_p"] == pytest.approx(p)
        assert found["ci"][0] <= found["difference"] <= found["ci"][1]


def test_step_diagnostics_account_for_every_test_expression_as_the_scorer_does(demo: dict[str, Any]) -> None:
    for m in demo["results"]["models"].values():
        for prompt in ("rec", "scout"):
            misses, scores = m["misses"][prompt]["all"], m["refexp"][prompt]["test"]
            answer = misses["answer"]
            assert misses["n"] == scores["n"] == sum(a["k"] for a in answer.values())
            assert answer["right"]["k"] == round(scores["acc@0.5"] * scores["n"])  # the scorer's own count
            roles = misses["by_role"]
            assert sum(r["n"] for r in roles.values()) == misses["step_accuracy"]["n"]
            assert sum(r["k"] for r in roles.values()) == misses["step_accuracy"]["k"]
            assert sum(m["misses"][prompt][t]["n"] for t in scores["by_type"]) == misses["n"]
    report = (demo["out"] / "report.md").read_text()
    assert "## Step diagnostics (step-by-step prompt, test split)" in report
    both = report.split("## Both prompts, by expression type", 1)[1].split("##", 1)[0]
    for model in MODELS:
        assert sum(line.startswith(f"| {ROW_LABELS[model]} |") for line in both.splitlines()) == (
            2 if model == "base" else 3), model


def test_steps_against_one_shot_are_paired_within_each_type(demo: dict[str, Any]) -> None:
    metrics = json.loads((demo["out"] / "work" / "eval" / "metrics.json").read_text())["models"]
    for name in MODELS[1:]:
        m = metrics[name]
        paired = m["steps_vs_one_shot"]
        types = m["refexp"]["scout"]["test"]["type_of"]
        assert set(paired) == {"all", *types.values()}
        for t, result in paired.items():
            ids = [i for i, ti in types.items() if t in ("all", ti)]
            steps, one_shot = (m["refexp"][p]["test"]["correct"] for p in ("scout", "rec"))
            assert result["n"] == len(ids)
            assert (result["only_a"], result["only_b"]) == (sum(steps[i] and not one_shot[i] for i in ids),
                                                           sum(one_shot[i] and not steps[i] for i in ids))


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
    base = answers(out, "base", "understanding")
    questions = [q["question_id"] for q in read_jsonl(out / "work" / "eval" / "questions" / "understanding.jsonl")]
    for twist in TWIST:
        got = answers(out, twist, "understanding")
        frozen = [q for q in questions if got[q]["metadata"]["route"] == "frozen"]
        assert [got[q]["text"] for q in frozen] == [base[q]["text"] for q in frozen]
        identical = sum(got[q]["text"].strip() == base[q]["text"].strip() for q in questions) / len(questions)
        assert demo["results"]["models"][twist]["retention"]["identical_rate"] == pytest.approx(identical)


def test_twist_on_the_forced_frozen_route_answers_every_understanding_question_as_the_base(
        demo: dict[str, Any], tmp_path: Path) -> None:
    """Whatever the router learnt in the ci budget: the frozen route, forced, is the base's computation."""
    out = demo["out"]
    layout = Layout(out)
    questions = layout.eval / "questions" / "understanding.jsonl"
    base = answers(out, "base", "understanding")
    for model in evaluated_models(RECIPE, layout):
        if not model.twist:
            continue
        got = tmp_path / f"{model.name}.jsonl"
        subprocess.run([sys.executable, "-m", "llava_twist.eval.model_grounding", "--model-path", str(model.folder),
                        "--model-base", str(layout.model("base")), "--route", "frozen", "--question-file",
                        str(questions), "--image-folder", str(layout.data), "--answers-file", str(got),
                        "--batch-size", str(RECIPE.eval.batch_size), "--max_new_tokens",
                        str(RECIPE.eval.max_new_tokens), "--conv-mode", DEFAULT_CONV_MODE, "--temperature", "0",
                        "--device", "cpu", "--prompt", "scout"], check=True, capture_output=True, timeout=600)
        forced = {a["question_id"]: a for a in map(json.loads, got.read_text().splitlines())}
        assert set(forced) == set(base)
        assert all(forced[q]["metadata"]["route"] == "frozen" for q in forced)
        assert {q: forced[q]["text"] for q in forced} == {q: base[q]["text"] for q in base}, model.name


def test_router_output_is_recorded(demo: dict[str, Any]) -> None:
    for twist in TWIST:
        for prompt in ("rec", "scout", "understanding"):
            for a in answers(demo["out"], twist, prompt).values():
                meta = a["metadata"]
                assert meta["route"] in ("frozen", "grounding") and meta["route_forced"] is False
                assert 0.0 <= meta["router_prob"] <= 1.0
    for model in ("base", "full-ft", "lora"):
        assert all(a["metadata"]["route"] is None for a in answers(demo["out"], model, "rec").values())


def test_playground_json_points_at_a_loadable_twist_delta(demo: dict[str, Any]) -> None:
    from llava_twist.eval.prompts import question_prompt
    from llava_twist.model.builder import DELTA_WEIGHTS, load_pretrained_model
    from playground.models import find_demo_model

    source = find_demo_model(demo["out"])
    assert source is not None and not Path(json.loads((demo["out"] / "playground.json").read_text())[
        "model_path"]).is_absolute()
    assert Path(source.model_path, DELTA_WEIGHTS).is_file() and Path(source.model_base, "config.json").is_file()
    best = demo["results"]["best_twist"]
    stage = dict(zip(TWIST, (v.stage for v in RECIPE.twist_variants), strict=True))[best]
    assert Path(source.model_path).name == stage
    # the playground's examples: the first test expressions, in order, asked step by step
    examples = json.loads((Path(source.examples) / "examples.json").read_text())
    test = read_jsonl(demo["out"] / "work" / "eval" / "questions" / "refexp-test.jsonl")[:len(examples)]
    assert [e["image"] for e in examples] == [Path(q["image"]).name for q in test]
    assert [e["query"] for e in examples] == [question_prompt(q, "scout") for q in test]
    assert all((Path(source.examples) / e["image"]).is_file() for e in examples) and examples
    metrics = json.loads((demo["out"] / "work" / "eval" / "metrics.json").read_text())["models"][best]
    right = sum(metrics["refexp"]["scout"]["test"]["correct"][q["question_id"]] for q in test)
    assert demo["results"]["playground"]["correct"] == right
    assert f"its examples are the first {len(examples)} test expressions" in (demo["out"] / "report.md").read_text()
    _, model, _, _ = load_pretrained_model(source.model_path, source.model_base, device="cpu")
    assert model.config.model_type == "llava_twist"


# ---------------------------------------------------------------- the stage cache on toy stages


class ToyRecipe:
    profile, threads, device = "toy", 1, "cpu"

    def __init__(self, **settings: int) -> None:
        self.settings = settings



def toy_config(stage: str) -> Any:
    return lambda recipe: {"value": recipe.settings.get(stage, 0)}


def toy_stages(calls: list[str]) -> list[Stage]:
    def body(ctx: Context) -> dict[str, Any]:
        calls.append(ctx.stage)
        (ctx.folder / "out.txt").write_text(ctx.stage)
        return {}

    return [Stage(name, lambda lay, name=name: lay.work / name, deps, body, toy_config(name))
            for name, deps in (("a", ()), ("b", ("a",)), ("c", ()))]


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
    assert stage_config(RECIPE, "warmup-boxes")["train"] == asdict(RECIPE.warmups[1].train)
    bare = replace(RECIPE, warmups=())
    assert {s.name: s.deps for s in build_stages(bare)}["base"] == ("model", "data")
    assert "warmup-look" not in [s.name for s in build_stages(bare)]
    assert stage_config(replace(RECIPE, warmups=RECIPE.warmups[:1]), "data") != stage_config(RECIPE, "data")


def test_lora_is_opt_in_where_the_profile_leaves_it_out() -> None:
    full = get_recipe("full")
    assert not full.run_lora and "lora" not in [s.name for s in build_stages(full)]
    with_lora = replace(full, run_lora=True)
    assert "lora" in [s.name for s in build_stages(with_lora)]
    assert stage_config(with_lora, "twist-layer-all") == stage_config(full, "twist-layer-all")  # runs stay cached


def test_twist_only_trains_no_baseline_and_keeps_twists_stamp() -> None:
    full = get_recipe("full")
    alone = replace(full, run_full_ft=False)
    names = [s.name for s in build_stages(alone)]
    assert "full-ft" not in names and "lora" not in names and "twist-layer-all" in names
    assert stage_config(alone, "twist-layer-all") == stage_config(full, "twist-layer-all")
    assert [m.name for m in evaluated_models(alone, Layout(Path("x")))] == ["base", "twist"]


def test_the_one_shot_only_variant_sees_the_default_runs_one_shot_samples(tmp_path: Path) -> None:
    from playground.miniature.data import training_set
    from playground.miniature.launch import twist_spec

    full, layout = get_recipe("full"), Layout(tmp_path)
    layout.data.mkdir(parents=True)
    one_shot, chain, replay = {"kind": "region"}, {"kind": "refexp"}, {"kind": "qa"}
    training_set(layout, "mixed").write_text(json.dumps([one_shot] * 6 + [chain] * 3 + [replay] * 3))
    training_set(layout, "rec").write_text(json.dumps([one_shot] * 6 + [replay] * 2))
    rec = VARIANTS["rec"]
    assert rec.match_one_shot and rec.data == "rec"
    steps = twist_spec(full, layout, rec).steps  # 1000 steps at 6/12 one-shot = 500 steps' worth at 6/8
    assert steps == round(full.twist.steps * (6 / 12) / (6 / 8))
    assert twist_spec(full, layout, full.twist_variants[0]) == full.twist


def test_full_starts_from_the_released_base_and_ci_trains_its_own() -> None:
    full, ci = get_recipe("full"), get_recipe("ci")
    assert full.shipped_base and not ci.shipped_base
    assert [w.name for w in full.warmups] == ["look", "boxes"]
    assert BOX_LESSON.data.kinds == "region:1" and BOX_LESSON.data.max_objects == 1
    assert full.grounding_data.chain_style == "decide" and full.base_data.grid == full.grounding_data.grid == 4
    # the base hash covers what makes the base's weights, and nothing the grounding runs read
    assert replace(full, full_ft=replace(full.full_ft, steps=1)).base_hash() == full.base_hash()
    assert replace(full, base=replace(full.base, steps=1)).base_hash() != full.base_hash()
    assert replace(full, base_data=replace(full.base_data, num=1)).base_hash() != full.base_hash()


def test_a_training_seed_redoes_the_grounding_runs_on_the_same_data_and_questions(tmp_path: Path) -> None:
    from playground.miniature.checkout import DEMO_OUT
    from playground.miniature.cli import default_out
    from playground.miniature.launch import twist_launch

    full = replace(get_recipe("full"), run_lora=True)
    seeded = replace(full, train_seed=1)
    assert seeded.base_hash() == full.base_hash()  # the released base still fits
    for stage in ("data", "base", "eval"):
        assert stage_config(seeded, stage) == stage_config(full, stage), stage
    for stage in ("full-ft", "lora", *(v.stage for v in full.twist_variants)):
        assert stage_config(seeded, stage) != stage_config(full, stage), stage
    _, _, extra = twist_launch(seeded, Layout(tmp_path), seeded.twist_variants[0], tmp_path / "o", sys.executable)
    assert extra[len(extra) - 1 - extra[::-1].index("--seed") + 1] == "1"  # the last --seed wins
    assert default_out(0) == DEMO_OUT and default_out(1) == DEMO_OUT.with_name("demo-seed1")


def test_grounding_records_are_one_shot_expressions_and_chains_of_every_type(demo: dict[str, Any]) -> None:
    data = demo["out"] / "work" / "data"
    records = json.loads((data / "grounding" / "train.json").read_text())
    kinds = {r["kind"] for r in records}
    assert kinds == {"region", "refexp", "find_all"}
    one_shot = [r for r in records if r["kind"] == "region"]
    assert all(r["conversations"][0]["value"].startswith("<image>\nPlease provide the bounding box coordinate")
               for r in one_shot)
    assert {r["source_ids"]["expression_type"] for r in one_shot} == {"attribute", "relation", "superlative"}
    # the rec variant trains on the one-shot records alone, with the same replay share
    mixed, rec = (json.loads((data / name).read_text()) for name in ("mixed.json", "mixed-rec.json"))
    assert {r["kind"] for r in rec} == {"region", "qa"}
    assert sum(r["kind"] == "region" for r in rec) == len(one_shot)
    share = [sum(r["task"] == "understanding" for r in m) / len(m) for m in (mixed, rec)]
    assert share[0] == pytest.approx(share[1], abs=0.05)
    log = (demo["out"] / "logs" / "twist-rec.log").read_text()
    assert "mixed-rec.json" in log


def test_a_failed_command_names_the_stage_and_quotes_its_log(tmp_path: Path) -> None:
    def body(ctx: Context) -> None:
        ctx.run([sys.executable, "-c", "print('\\n'.join(f'line {i}' for i in range(50))); raise SystemExit(3)"])

    stage = Stage("broken", lambda lay: lay.work / "broken", (), body, toy_config("broken"))
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

    from llava_twist.train.arguments import DataArguments, ModelArguments, TrainingArguments, TwistArguments
    from playground.miniature.checkout import LLAVA_DS_CONFIG, TRAIN_LLAVA
    from playground.miniature.launch import grounding_train_args, llava_train_args, twist_launch

    full, gpu = get_recipe("full"), get_recipe("gpu")
    assert (full.device, gpu.device) == ("cpu", "cuda") and gpu.shipped_base is None
    assert gpu.model.hidden_size > full.model.hidden_size and gpu.twist.steps > full.twist.steps
    assert gpu.grounding_data.grid == full.grounding_data.grid and gpu.base_hash() != full.base_hash()
    # where a run runs changes its results (a stage's stamp), not what the released base is made of
    assert replace(full, device="cuda").base_hash() == full.base_hash()
    assert stage_config(replace(full, device="cuda"), "full-ft") != stage_config(full, "full-ft")

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
        assert args.group_by_modality_length is True and args.seed == recipe.train_seed
        ctx = Context(recipe, layout, "full-ft", work, {})
        llava = grounding_train_args(ctx, work / "o", recipe.full_ft)
        if bf16:  # LLaVA's trainer under DeepSpeed (fp32 master weights), the script path its launcher runs
            assert Path(llava[0]).name == "deepspeed" and Path(llava[3]) == TRAIN_LLAVA and TRAIN_LLAVA.is_file()
            trainer_argv = llava[4:]
        else:
            assert llava[:3] == [sys.executable, "-m", "llava_twist.train.train_llava"]
            trainer_argv = llava[3:]
        args, unknown = llava_parser.parse_known_args(trainer_argv)
        assert unknown == [] and args.bf16 is bf16 and args.max_steps == recipe.full_ft.steps
        assert args.group_by_modality_length is True
        base_argv = llava_train_args(ctx, layout.model("base"), work / "d.json", work, work / "o", recipe.base)
        assert "--group_by_modality_length False" in " ".join(base_argv)  # the base trains as it was released
        assert args.deepspeed == (str(LLAVA_DS_CONFIG) if bf16 else None)
        with pytest.MonkeyPatch.context() as mp:  # the suite hides CUDA itself: look at what the profile sets
            mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
            assert ctx.env().get("CUDA_VISIBLE_DEVICES") == (None if bf16 else "")  # a CPU profile never takes a GPU


def test_cpu_runs_use_the_same_kernels_on_every_x86_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AVX-512 and AVX2 kernels round GELU differently: every subprocess of a CPU run is capped at AVX2, so a
    training reproduces across machines; a value the user set wins."""
    from playground.miniature.runner import PORTABLE_CPU_KERNELS

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    env = Context(RECIPE, Layout(tmp_path), "data", tmp_path, {}).env()
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["MKL_CBWR"] == "COMPATIBLE"
    assert set(PORTABLE_CPU_KERNELS) <= set(env)
    if os.uname().machine == "x86_64":
        code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "AVX2"

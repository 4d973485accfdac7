"""The ``eval`` stage (every model's answers and scores: ``metrics.json``, each model's headline under the prompt
that is better on dev, reported on test, compared with the base and TWIST with full FT on the same questions) and
the ``base-eval`` stage of ``make base`` (the figures of the base's card)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from llava_twist.eval.common import group_key, read_jsonl
from playground.miniature.answering import (
    HEADLINE_SET,
    PROMPTS,
    UNDERSTANDING,
    Evaluated,
    answer,
    answer_all,
    build_questions,
    chain_loss,
    evaluated_models,
    heldout_records,
    image_reliance,
    question_dir,
    region_questions,
)
from playground.miniature.chain_misses import chain_misses
from playground.miniature.recipe import Recipe
from playground.miniature.runner import Context, write_json
from playground.miniature.scoring import (
    compare,
    identical_rate,
    refexp_scores,
    router_scores,
    score_model,
    summary,
    understanding_scores,
)


def evaluate(ctx: Context) -> dict[str, Any]:
    """Answer the held-out questions with every model under each prompt and score them (``metrics.json``)."""
    recipe, layout = ctx.recipe, ctx.layout
    questions = build_questions(layout)
    models = evaluated_models(recipe, layout)
    answers = {m.name: answer_all(ctx, m) for m in models}
    scores = {m.name: score_model(questions, answers[m.name]) for m in models}
    test_records = {f"{HEADLINE_SET}/{r['id']}": r for r in heldout_records(layout, HEADLINE_SET)}
    base = scores["base"]
    seed = recipe.seed
    for m in models:
        s = scores[m.name]
        s["misses"] = {p: chain_misses(questions[HEADLINE_SET], answers[m.name][p], test_records) for p in PROMPTS}
        s["chain_loss"] = chain_loss(ctx, m)
        if m.twist:
            s["router"] = router_scores(answers[m.name])
        if m.name == "base":
            continue
        s["vs_base"] = compare(s["headline"]["correct"], base["headline"]["correct"], seed)
        s["vs_base_same_prompt"] = {
            p: compare(s["refexp"][p][HEADLINE_SET]["correct"], base["refexp"][p][HEADLINE_SET]["correct"], seed)
            for p in PROMPTS}
        s["retention"] = {
            **identical_rate(answers["base"][UNDERSTANDING], answers[m.name][UNDERSTANDING]),
            "vs_base": compare(s[UNDERSTANDING]["correct"], base[UNDERSTANDING]["correct"], seed)}
        if m.twist and "full-ft" in scores:
            s["vs_full_ft"] = compare(s["headline"]["correct"], scores["full-ft"]["headline"]["correct"], seed)
        s["steps_vs_one_shot"] = steps_vs_one_shot(s, seed)
    rec_only = {m.name for m in models if m.twist and variant_data(recipe, m.stage) == "rec"}
    for m in models:
        if m.twist and variant_data(recipe, m.stage) == "mixed":
            scores[m.name]["one_shot_vs_rec_variant"] = {
                other: compare(scores[m.name]["refexp"]["rec"][HEADLINE_SET]["correct"],
                               scores[other]["refexp"]["rec"][HEADLINE_SET]["correct"], seed) for other in rec_only}
    counts = {name: len(rows) for name, rows in questions.items()}
    counts["test_by_type"] = dict(Counter(group_key(q, ("expression_type",)) for q in questions[HEADLINE_SET]))
    write_json(layout.eval / "metrics.json", {"questions": counts, "models": scores})
    return {"questions": counts, "prompts": {m.name: scores[m.name]["prompt"] for m in models}}


def variant_data(recipe: Recipe, stage: str) -> str:
    """The training set of the TWIST variant that ``stage`` trains (``mixed`` or ``rec``)."""
    return next(v.data for v in recipe.twist_variants if v.stage == stage)


def steps_vs_one_shot(scores: dict[str, Any], seed: int) -> dict[str, Any]:
    """A model's step-by-step answers against its own one-shot answers on the test split, paired, overall and within
    each expression type."""
    by = {p: scores["refexp"][p][HEADLINE_SET]["correct"] for p in PROMPTS}
    types = scores["refexp"]["scout"][HEADLINE_SET].get("type_of", {})
    out = {"all": compare(by["scout"], by["rec"], seed)}
    for t in sorted(set(types.values())):
        ids = [i for i, ti in types.items() if ti == t]
        out[t] = compare({i: by["scout"][i] for i in ids}, {i: by["rec"][i] for i in ids}, seed)
    return out


def evaluate_base(ctx: Context) -> dict[str, Any]:
    """The figures of a base's card (``make base``): held-out understanding, one-shot Acc@0.5 with LLaVA-1.5's REC
    prompt on the held-out referring expressions and on its own region prompts, and how much it uses the image."""
    layout, limit = ctx.layout, ctx.recipe.base_eval_limit
    questions = build_questions(layout, limit)
    base = Evaluated("base", "base", layout.model("base"))
    region = region_questions(layout, limit)
    jobs = {UNDERSTANDING: (question_dir(layout) / f"{UNDERSTANDING}.jsonl", "scout"),
            "refexp": (question_dir(layout) / f"refexp-{HEADLINE_SET}.jsonl", PROMPTS["rec"]),
            "region": (region, "scout")}
    answers = {}
    for name, (file, style) in jobs.items():
        out = ctx.folder / name / "answers.jsonl"
        answer(ctx, base, file, out, style)
        answers[name] = read_jsonl(str(out), "answers")
    figures = {
        UNDERSTANDING: summary(understanding_scores(questions[UNDERSTANDING], answers[UNDERSTANDING])),
        "one_shot": {"refexp": summary(refexp_scores(questions[HEADLINE_SET], answers["refexp"])),
                     "region": summary(refexp_scores(read_jsonl(str(region), "questions"), answers["region"]))},
        "image_reliance": image_reliance(ctx, base.folder, ctx.folder / "image_reliance.json"),
    }
    write_json(ctx.folder / "figures.json", figures)
    return figures

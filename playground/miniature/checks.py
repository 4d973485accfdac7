"""What the demo must show, checked against its measured numbers (``Recipe.checks``), and which TWIST it shows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_twist.eval.paired import describe
from playground.miniature.formatting import dig, label, pct
from playground.miniature.recipe import Recipe


@dataclass
class Check:
    model: str
    what: str
    passed: bool | None  # None: not measurable (e.g. no questions)
    measured: str
    target: str

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]
        return f"- **{mark}** {label(self.model)}: {self.what}: {self.measured} (target: {self.target})"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "check": self.what, "passed": self.passed, "measured": self.measured,
                "target": self.target}


def twist_checks(recipe: Recipe, name: str, models: dict[str, dict[str, Any]]) -> list[Check]:
    """What the demo must show, for one TWIST variant, against the measured numbers (test split, each model's
    prompt chosen on dev)."""
    c = recipe.checks
    m = models[name]
    identical = dig(m, "retention", "identical_rate")
    router = dig(m, "router", "accuracy")
    vs_base, vs_full = m.get("vs_base"), m.get("vs_full_ft")
    gain = dig(vs_base, "difference")
    acc, acc_full = dig(m, "headline", "acc@0.5"), dig(models, "full-ft", "headline", "acc@0.5")
    ratio = None if acc is None or not acc_full else acc / acc_full
    significant = None if vs_base is None else vs_base["ci"][0] > 0 and vs_base["mcnemar_p"] < c.max_p_value
    paired = m.get("steps_vs_one_shot") or {}
    pays = [paired.get(t) for t in ("all", *c.steps_pay_types)]
    steps_pay = None if None in pays else all(r["difference"] > 0 and r["mcnemar_p"] < c.max_p_value for r in pays)
    chains = [Check(name, f"one-shot Acc@0.5 against {label(other)} (the one-shot records alone, as many one-shot "
                          "samples)", r["difference"] >= 0, describe(r), ">= 0 points")
              for other, r in (m.get("one_shot_vs_rec_variant") or {}).items()]
    return [
        Check(name, "understanding answers identical to the base's",
              None if identical is None else identical >= c.identical_rate, pct(identical), pct(c.identical_rate)),
        Check(name, "router right on held-out prompts", None if router is None else router >= c.router_accuracy,
              f"{pct(router)} (grounding prompts {pct(dig(m, 'router', 'by_task', 'grounding', 'accuracy'))}, "
              f"understanding {pct(dig(m, 'router', 'by_task', 'understanding', 'accuracy'))})",
              f">= {pct(c.router_accuracy)}"),
        Check(name, "Acc@0.5 gain over the base", None if gain is None else gain >= c.gain_over_base,
              f"{pct(acc)} vs {pct(dig(models, 'base', 'headline', 'acc@0.5'))} "
              f"({'–' if gain is None else f'{100 * gain:+.1f}'} points)", f"+{100 * c.gain_over_base:.0f} points"),
        Check(name, "that gain, paired", significant, "–" if vs_base is None else describe(vs_base),
              f"95% interval above 0 and McNemar p < {c.max_p_value:g}"),
        Check(name, "Acc@0.5 relative to full fine-tuning at the same budget",
              None if ratio is None else ratio >= c.ratio_to_full_ft,
              f"{pct(acc)} vs {pct(acc_full)} ({'–' if ratio is None else f'{ratio:.2f}x'}"
              + ("" if vs_full is None else f"; paired {describe(vs_full)}") + ")", f">= {c.ratio_to_full_ft:g}x"),
        Check(name, "step-by-step answers against its own one-shot answers, overall / "
              + " / ".join(c.steps_pay_types), steps_pay,
              "; ".join("–" if r is None else describe(r) for r in pays),
              f"better, McNemar p < {c.max_p_value:g}, each"),
        *chains,
    ]


def best_twist(names: list[str], models: dict[str, dict[str, Any]]) -> str:
    """The TWIST model with the highest test Acc@0.5 (the first on ties)."""
    twists = [n for n in names if n.startswith("twist")]
    return max(twists, key=lambda n: (dig(models[n], "headline", "acc@0.5") or 0.0, -twists.index(n)))

"""Command line of ``make demo``: run the stages in order with a progress bar and one line per stage."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import playground.miniature as miniature
from playground.miniature.checkout import DEMO_OUT
from playground.miniature.recipe import PROFILES, VARIANTS, Recipe, default_profile, get_recipe
from playground.miniature.runner import StageResult, run_guarded, run_stages
from playground.miniature.stages import build_stages
from playground.pointer import read_pointer
from scout_data.limits import OneLineParser


def run_demo(recipe: Recipe, out: str | Path, force: Sequence[str] = (), progress: bool | None = None,
             echo: bool = True) -> list[StageResult]:
    """Run (or reuse) every stage of ``recipe`` into ``out``; ``force`` names stages to redo (or ``all``)."""
    return run_stages(build_stages(recipe), recipe, out, force, progress, echo)


def default_out(seed: int) -> Path:
    """Where a run goes without ``--out``: the folder ``make playground`` opens, another for another seed."""
    return DEMO_OUT.with_name(f"{DEMO_OUT.name}-seed{seed}") if seed else DEMO_OUT


def playground_hint(out: Path) -> str:
    """How to open the trained model: ``make playground`` for the default folder, else the explicit command."""
    if out.resolve() == DEMO_OUT.resolve():
        return "make playground"
    pointer = read_pointer(out)
    base = f" --model-base {pointer.model_base}" if pointer and pointer.model_base else ""
    return f"python -m playground --model-path {pointer.model_path if pointer else '?'}{base}"


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="python -m playground.miniature", description=miniature.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="full: make demo on CPU (from the released base); gpu: a larger model in bf16 with more "
                        "steps, training its own base; ci: the same pipeline in minutes (tests). Default: gpu "
                        "where CUDA is present, else full")
    p.add_argument("--out", default=None,
                   help=f"everything goes here (default: {DEMO_OUT}; {DEMO_OUT}-seedN with --seed N)")
    p.add_argument("--seed", type=int, default=0,
                   help="the grounding runs' training seed (data order, LoRA's adapters); the base, the data and the "
                        "held-out questions stay the same, so runs of two seeds are scored on the same questions")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE (and everything downstream) even if cached; repeatable; 'all' redoes all")
    p.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS), metavar="NAME",
                   help="also train and compare this TWIST variant (repeatable; "
                        + "; ".join(f"{k}: {' '.join(v.flags)}" for k, v in VARIANTS.items()) + ")")
    p.add_argument("--lora", action="store_true",
                   help="also train and score LoRA (LLaVA's own LoRA path) where the profile leaves it out")
    p.add_argument("--twist-only", action="store_true",
                   help="train TWIST (and its variants) alone beside the base, without full fine-tuning or LoRA "
                        "(e.g. with --seed N: a second training seed of TWIST, scored on the same questions)")
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads per process (default: cores over a stage's processes; not in the cache key)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    recipe = get_recipe(args.profile or default_profile())
    extra = tuple(VARIANTS[n] for n in dict.fromkeys(args.variant) if VARIANTS[n] not in recipe.twist_variants)
    recipe = dataclasses.replace(recipe, twist_variants=recipe.twist_variants + extra)
    if args.lora:
        recipe = dataclasses.replace(recipe, run_lora=True)
    if args.twist_only:
        recipe = dataclasses.replace(recipe, run_full_ft=False, run_lora=False)
    if args.threads is not None:
        recipe = dataclasses.replace(recipe, threads=max(1, args.threads))
    if args.seed:
        recipe = dataclasses.replace(recipe, train_seed=args.seed)
    out = Path(args.out) if args.out else default_out(args.seed)
    start = time.perf_counter()
    results, status = run_guarded(lambda: run_demo(recipe, out, args.force,
                                                   progress=False if args.no_progress else None))
    if results is None:
        return status
    ran = sum(not r.cached for r in results)
    print(f"{ran} of {len(results)} stages ran, {len(results) - ran} cached, in {time.perf_counter() - start:.1f} s")
    print(f"report: {out / 'report.md'} (grid: {out / 'grid.png'}); open the trained model: {playground_hint(out)}")
    return 0

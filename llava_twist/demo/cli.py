"""Command line of ``make demo``: run the stages in order with a progress bar and one line per stage."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import llava_twist.demo as demo_package
from llava_twist.demo.pipeline import Layout, StageError, StageResult, run_stage
from llava_twist.demo.pointer import read_pointer
from llava_twist.demo.recipe import PROFILES, VARIANTS, Recipe, default_profile, get_recipe

T = TypeVar("T")
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "playground" / "data" / "demo"  # what `make playground` opens


def run_demo(recipe: Recipe, out: str | Path, force: Sequence[str] = (), progress: bool | None = None,
             echo: bool = True, base_only: bool = False) -> list[StageResult]:
    """Run (or reuse) every stage of ``recipe`` into ``out``; ``force`` names stages to redo (or ``all``);
    ``base_only``: the stages that make and measure the base (``make base``)."""
    from tqdm import tqdm

    from llava_twist.demo.stages import build_stages

    layout = Layout(Path(out).resolve())
    stages = build_stages(recipe, base_only)
    names = [s.name for s in stages]
    unknown = sorted(set(force) - {*names, "all"})
    if unknown:
        raise ValueError(f"--force {', '.join(unknown)}: no such stage; stages are {', '.join(names)}")
    layout.out.mkdir(parents=True, exist_ok=True)
    stamps: dict = {}
    results: list[StageResult] = []
    bar = tqdm(total=len(stages), desc=f"demo ({recipe.profile})", unit="stage", file=sys.stderr,
               disable=(not progress) if progress is not None else None, dynamic_ncols=True)
    try:
        for stage in stages:
            bar.set_postfix_str(stage.name)
            result = run_stage(stage, recipe, layout, stamps, force="all" in force or stage.name in force)
            stamps[stage.name] = result.stamp
            results.append(result)
            line = f"[{stage.name}] cached" if result.cached else f"[{stage.name}] done in {result.seconds:.1f} s"
            if echo:
                bar.write(line, file=sys.stdout)
            bar.update(1)
    finally:
        bar.close()
    return results


def run_guarded(body: Callable[[], T]) -> tuple[T | None, int]:
    """``body()`` and exit status 0; a failed stage or a bad setting is one line on stderr (status 1), an
    interrupt says how to go on (130)."""
    try:
        return body(), 0
    except (StageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 1
    except KeyboardInterrupt:
        print("interrupted; run again to continue (finished stages are cached)", file=sys.stderr)
        return None, 130


def default_out(seed: int) -> Path:
    """Where a run goes without ``--out``: the folder ``make playground`` opens, another for another seed."""
    return DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-seed{seed}") if seed else DEFAULT_OUT


def playground_hint(out: Path) -> str:
    """How to open the trained model: ``make playground`` for the default folder, else the explicit command."""
    if out.resolve() == DEFAULT_OUT.resolve():
        return "make playground"
    pointer = read_pointer(out)
    base = f" --model-base {pointer.model_base}" if pointer and pointer.model_base else ""
    return f"python -m playground --model-path {pointer.model_path if pointer else '?'}{base}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_twist.demo", description=demo_package.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="full: make demo on CPU (from the released base); gpu: a larger model in bf16 with more "
                        "steps, training its own base; ci: the same pipeline in minutes (tests). Default: gpu "
                        "where CUDA is present, else full")
    p.add_argument("--out", default=None,
                   help=f"everything goes here (default: {DEFAULT_OUT}; {DEFAULT_OUT}-seedN with --seed N)")
    p.add_argument("--seed", type=int, default=0,
                   help="the grounding runs' training seed (data order, LoRA's adapters); the base, the data and the "
                        "held-out questions stay the same, so runs of two seeds are scored on the same questions")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE (and everything downstream) even if cached; repeatable; 'all' redoes all")
    p.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS), metavar="NAME",
                   help="also train and compare this TWIST variant (repeatable; "
                        + "; ".join(f"{k}: {' '.join(v.flags)}" for k, v in VARIANTS.items()) + ")")
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads per process (default: cores over a stage's processes; not in the cache key)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    recipe = get_recipe(args.profile or default_profile())
    extra = tuple(VARIANTS[n] for n in dict.fromkeys(args.variant) if VARIANTS[n] not in recipe.twist_variants)
    recipe = dataclasses.replace(recipe, twist_variants=recipe.twist_variants + extra)
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

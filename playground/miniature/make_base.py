"""``make base``: train the demo's tiny "LLaVA-1.5" with its recipe and release it, so that ``make demo`` starts
from it the way a LLaVA user starts from a downloaded LLaVA.

The base is trained by the demo's own stages (the tiny tower's pretraining, the lessons, LLaVA's trainer on the
base mix), measured on held-out scenes, and written to ``playground/models/tiny-llava-v1.5`` in the release format
(``playground.miniature.release``). A recipe whose base part changed no longer matches the card's hash, and the
demo refuses the release.

    make base                                   # stages cached in playground/data/base-build
    python -m playground.miniature.make_base --profile ci --out /tmp/base --release /tmp/base/release
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from playground.miniature.checkout import BASE_BUILD, RELEASE_DIR, REPO
from playground.miniature.checkpoints import checkpoint_weights, tensor_numel
from playground.miniature.formatting import pct
from playground.miniature.recipe import PROFILES, get_recipe
from playground.miniature.release import CARD_MD, acc_cell, write_release
from playground.miniature.runner import Layout, read_json, run_guarded, run_stages
from playground.miniature.stages import build_stages
from scout_data.limits import OneLineParser

PROG = "python -m playground.miniature.make_base"


def _world(recipe: Any) -> str:
    d = recipe.base_data
    grid = f", in a {d.grid} x {d.grid} grid" if d.grid else ""
    return (f"{d.image_size} px scenes of {d.min_objects}-{d.max_objects} objects{grid} "
            f"(shapes {d.shapes or 'default'}; colours {d.colours or 'default'}; sizes {d.sizes or 'default'})")


def build_base(profile: str, out: Path, release: Path, force: Sequence[str] = (), progress: bool | None = None
               ) -> dict[str, Any]:
    """Train (or reuse the cached stages of) the base of ``profile``'s recipe into ``out``, measure it, and
    release it to ``release``. Returns the card."""
    recipe = dataclasses.replace(get_recipe(profile), shipped_base=None)
    results = run_stages(build_stages(recipe, base_only=True), recipe, out, force, progress)
    layout = Layout(Path(out).resolve())
    seconds = {r.name: round(r.seconds, 1) for r in results if r.name not in ("data", "base-eval")}
    model_info = next((r.stamp.get("info") or {} for r in results if r.name == "model"), {})
    card = {
        "name": "tiny-llava-v1.5",
        "profile": recipe.profile,
        "recipe_hash": recipe.base_hash(),
        "recipe": recipe.base_recipe(),
        "world": _world(recipe),
        "figures": read_json(layout.eval / "figures.json"),
        "vision_pretraining": model_info.get("vision_pretraining"),
        "stage_seconds": seconds,
        "training_seconds": round(sum(seconds.values()), 1),
        "params": sum(tensor_numel(p) for p in checkpoint_weights(layout.model("base"))),
        "command": "make base" if profile == "full" else f"{PROG} --profile {profile}",
        "machine": f"{os.cpu_count()} CPU cores",
        "finished": time.strftime("%Y-%m-%d %H:%M"),
    }
    return write_release(layout.model("base"), release, card)


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="full", help="whose base (default %(default)s)")
    p.add_argument("--out", default=str(BASE_BUILD), help="the build's stages (default: %(default)s)")
    p.add_argument("--release", default=str(REPO / RELEASE_DIR), help="where the release goes (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a release already there (git keeps the old)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo STAGE even if cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    release = Path(args.release)
    if release.exists() and not args.overwrite:
        print(f"error: {release}: a release is already there; pass --overwrite to replace it", file=sys.stderr)
        return 2
    start = time.perf_counter()
    card, status = run_guarded(lambda: build_base(args.profile, Path(args.out), release, args.force,
                                                  progress=False if args.no_progress else None))
    if card is None:
        return status
    f = card["figures"]
    print(f"released {release} in {time.perf_counter() - start:.0f} s (training {card['training_seconds']:.0f} s): "
          f"understanding {pct(f['understanding']['accuracy'])}, one-shot refexp simple "
          f"{acc_cell(f, 'refexp', 'simple')}, hard {acc_cell(f, 'refexp', 'hard')}; card: {release / CARD_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

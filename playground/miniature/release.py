"""The release format of the demo's tiny "LLaVA-1.5" base, as ``liuhaotian/llava-v1.5-7b`` is released: LLaVA-1.5's
on-disk layout (``config.json``, ``model.safetensors``, tokenizer, the vision tower in ``clip-vision-tower/``) with
a model card, ``README.md`` for readers and ``card.json`` with the recipe, its hash, the training time, the figures
and the sha256 of every weight file. ``make base`` writes one (``playground.miniature.make_base``); the demo installs
it into a run, refusing a release made by another recipe or whose weights differ from its card.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from playground.miniature.checkout import RELEASE_DIR, REPO
from playground.miniature.formatting import pct
from scout_data.output import replace_folder

CARD_JSON = "card.json"
CARD_MD = "README.md"
TOWER = "clip-vision-tower"
WEIGHTS = "model.safetensors"
TRAINING_FILES = {".done.json", "trainer_state.json", "training_args.bin"}
MAX_RELEASE_BYTES = 25 * 2**20


class ReleaseError(ValueError):
    """A release that is missing, incomplete or made by another recipe."""


def release_weights(folder: Path) -> Path:
    return folder / WEIGHTS


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_checksums(folder: Path) -> dict[str, str]:
    """The sha256 of every weight file of a release (``*.safetensors``, the tower's too), by relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def check_weights(release: Path, card: dict[str, Any]) -> None:
    """Refuse a release whose weight files are not the ones its card lists (swapped, retrained, truncated)."""
    listed = card.get("weights_sha256")
    if not isinstance(listed, dict) or not listed:
        raise ReleaseError(f"{release / CARD_JSON}: no weights_sha256 in the card; run `make base` to release it")
    found = weight_checksums(release)
    for name in sorted(set(listed) | set(found)):
        if listed.get(name) != found.get(name):
            what = "missing" if name not in found else "not in the card" if name not in listed else "changed"
            raise ReleaseError(f"{release / name}: weight file {what} (its sha256 does not match {CARD_JSON})")


def read_card(folder: Path) -> dict[str, Any]:
    """A release's ``card.json``."""
    path = folder / CARD_JSON
    if not path.is_file():
        raise ReleaseError(f"{path}: no model card; is {folder} a base released by `make base`?")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(card, dict) or not isinstance(card.get("recipe_hash"), str):
        raise ReleaseError(f"{path}: no recipe_hash in the card")
    return card


def _update_config(config_file: Path, **values: str) -> None:
    """Set ``values`` in a checkpoint's ``config.json`` (e.g. ``_name_or_path``: where the copy now lives)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(values)
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def install_release(release: Path, dest: Path, expected_hash: str) -> dict[str, Any]:
    """Copy a release into ``dest`` (a run's base folder) with its tower named by absolute path, after checking
    that its card was made by the recipe whose base hash is ``expected_hash``. Returns the card."""
    card = read_card(release)
    if card["recipe_hash"] != expected_hash:
        raise ReleaseError(
            f"{release / CARD_JSON}: made by base recipe {card['recipe_hash']}, but this recipe's base is "
            f"{expected_hash}; run `make base` to train and release the base of this recipe")
    missing = [f for f in ("config.json", WEIGHTS, TOWER) if not (release / f).exists()]
    if missing:
        raise ReleaseError(f"{release}: incomplete release, missing {', '.join(missing)}")
    check_weights(release, card)
    shutil.copytree(release, dest, dirs_exist_ok=True)
    _update_config(dest / "config.json", mm_vision_tower=str((dest / TOWER).resolve()), _name_or_path=str(release))
    return card


def tower_reference(release: Path) -> str:
    """How a release's config names its tower: repo-relative inside the repository (like a hub id, resolved from
    the repository's root, where LLaVA's scripts run), else absolute."""
    tower = release.resolve() / TOWER
    try:
        return str(tower.relative_to(REPO))
    except ValueError:
        return str(tower)


def write_release(base: Path, release: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write the trained ``base`` folder and its tower as a release with its card, replacing ``release`` whole
    only once the new one is complete (``scout_data.output.replace_folder``). Returns the card as written."""
    tower = Path(json.loads((base / "config.json").read_text(encoding="utf-8"))["mm_vision_tower"])
    written: dict[str, Any] = {}

    def write(folder: str) -> None:
        tmp = Path(folder)
        tmp.mkdir()
        for f in sorted(base.iterdir()):
            if f.is_file() and f.name not in TRAINING_FILES:
                shutil.copy2(f, tmp / f.name)
        shutil.copytree(tower, tmp / TOWER, ignore=shutil.ignore_patterns(*TRAINING_FILES, "dense_pretraining.json"))
        _update_config(tmp / "config.json", mm_vision_tower=tower_reference(release), _name_or_path=RELEASE_DIR)
        _update_config(tmp / TOWER / "config.json", _name_or_path=tower_reference(release))
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if size > MAX_RELEASE_BYTES:
            raise ReleaseError(f"the release would be {size / 2**20:.1f} MB, over the {MAX_RELEASE_BYTES >> 20} MB "
                               "a committed base may take")
        written.update(card, release_bytes=size, weights_sha256=weight_checksums(tmp))
        (tmp / CARD_JSON).write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_MD).write_text(card_markdown(written), encoding="utf-8")

    replace_folder(release, write)
    return written


def acc_cell(figures: dict[str, Any], bench: str, level: str) -> str:
    found = (figures.get("one_shot") or {}).get(bench) or {}
    part = found.get(level) or {}
    return f"{pct(part.get('acc@0.5'))} (n={part.get('n', 0)})"


def _by_type(understanding: dict[str, Any]) -> str:
    return ", ".join(f"{t} {pct(v['accuracy'])} ({v['n']})" for t, v in (understanding.get("by_type") or {}).items())


def card_markdown(card: dict[str, Any]) -> str:
    """The model card a reader sees beside the weights."""
    f = card["figures"]
    rel = f.get("image_reliance") or {}
    u = f.get("understanding") or {}
    v = (card.get("vision_pretraining") or {}).get("held_out")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in card["stage_seconds"].items())
    return "\n".join([
        "# tiny-llava-v1.5: the llava-twist demo's base model",
        "",
        "A tiny LLaVA-1.5 (Llama language model, `mlp2x_gelu` projector, CLIP vision tower) in LLaVA-1.5's on-disk "
        "layout, trained on the demo's synthetic world by `make base` with LLaVA's own trainer: the tower's dense "
        "pretraining, short lessons, then LLaVA-1.5's kind of mix (understanding conversations plus one-shot box "
        "prompts, no step-by-step chains). `make demo` adds grounding to it with TWIST, as a LLaVA user adds it to "
        "`liuhaotian/llava-v1.5-7b`. It knows nothing outside its world of "
        f"{card['world']}.",
        "",
        "```python",
        "from PIL import Image",
        "from llava_twist.serve.inference import generate, load_model",
        "",
        f'loaded = load_model("{RELEASE_DIR}")  # from the repository root: the tower path is repo-relative',
        'print(generate(loaded, ["What colour is the circle? Answer the question using a single word or phrase."],',
        '               [Image.open("scene.png")])[0].text)',
        "```",
        "",
        "## Measured on held-out scenes",
        "",
        "| figure | value |",
        "|---|---|",
        f"| understanding (short answers) | {pct(u.get('accuracy'))} (n={u.get('n', 0)}) |",
        *([f"| understanding by question type | {by_type} |"] if (by_type := _by_type(u)) else []),
        f"| one-shot box Acc@0.5, its own region prompts, simple | {acc_cell(f, 'region', 'simple')} |",
        f"| one-shot box Acc@0.5, its own region prompts, hard (same shape twice) | {acc_cell(f, 'region', 'hard')} |",
        f"| one-shot box Acc@0.5, the demo's referring expressions, simple | {acc_cell(f, 'refexp', 'simple')} |",
        f"| one-shot box Acc@0.5, the demo's referring expressions, hard (relations, superlatives, twins) | "
        f"{acc_cell(f, 'refexp', 'hard')} |",
        f"| image reliance: answer loss with own / shuffled images | {rel.get('loss_own_images', float('nan')):.3f} / "
        f"{rel.get('loss_shuffled_images', float('nan')):.3f} |",
        *([f"| vision tower (frozen): held-out patch read-outs shape / colour / size | {pct(v['shape_acc'])} / "
           f"{pct(v['colour_acc'])} / {pct(v['size_acc'])} |"] if v else []),
        "",
        "One-shot prompt: LLaVA-1.5's REC prompt, \"Please provide the bounding box coordinate of the region this "
        "sentence describes: ...\".",
        "",
        "## How it was made",
        "",
        f"- command: `{card['command']}` ({card['profile']} profile), finished {card['finished']}",
        f"- training time: {card['training_seconds'] / 60:.1f} min on {card['machine']} ({stages})",
        f"- recipe hash: `{card['recipe_hash']}` (the base part of `playground.miniature.recipe`; a test fails when "
        "the code's recipe no longer matches it)",
        f"- parameters: {card['params']:,}; release size {card.get('release_bytes', 0) / 2**20:.1f} MB",
        *(f"- sha256 of `{name}`: `{digest}` (the demo refuses weights that differ)"
          for name, digest in (card.get("weights_sha256") or {}).items()),
        "",
        "The recipe, as `card.json` holds it:",
        "",
        "```json",
        json.dumps(card["recipe"], indent=1),
        "```",
        "",
    ])

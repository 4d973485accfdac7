"""The released base (``make base``): the committed one matches the recipe that claims to make it, loads as a
LLaVA-1.5 checkpoint and answers; and the release path itself, on the ci profile's base."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from playground.miniature.make_base import build_base, main
from playground.miniature.recipe import SHIPPED_BASE, get_recipe
from playground.miniature.release import (
    CARD_JSON,
    CARD_MD,
    MAX_RELEASE_BYTES,
    TOWER,
    WEIGHTS,
    ReleaseError,
    card_markdown,
    install_release,
    read_card,
)
from playground.miniature.runner import STAMP
from playground.miniature.stages import build_stages

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / SHIPPED_BASE


def test_the_committed_base_was_made_by_the_recipe_in_the_code() -> None:
    card = read_card(RELEASE)
    recipe = get_recipe("full")
    assert card["recipe_hash"] == recipe.base_hash(), (
        "the base recipe in playground/miniature/recipe.py changed since the committed base was trained: run "
        "`make base` and commit the new release")
    assert card["recipe"] == json.loads(json.dumps(recipe.base_recipe()))
    assert card["recipe_hash"] in (RELEASE / CARD_MD).read_text()
    size = sum(p.stat().st_size for p in RELEASE.rglob("*") if p.is_file())
    assert (RELEASE / WEIGHTS).is_file() and size <= MAX_RELEASE_BYTES
    assert json.loads((RELEASE / "config.json").read_text())["mm_vision_tower"] == f"{SHIPPED_BASE}/{TOWER}"
    assert not list(RELEASE.glob("*.bin"))  # safetensors only
    figures = card["figures"]
    assert figures["understanding"]["n"] > 0 and figures["one_shot"]["refexp"]["hard"]["n"] > 0


def test_the_committed_card_readme_is_written_from_its_card_json() -> None:
    assert (RELEASE / CARD_MD).read_text(encoding="utf-8") == card_markdown(read_card(RELEASE))


def test_the_committed_weights_are_the_ones_the_card_lists() -> None:
    """sha256 computed here with hashlib over each file, against the card's list (both weight files, no other)."""
    card = read_card(RELEASE)
    found = {p.relative_to(RELEASE).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in RELEASE.rglob("*.safetensors")}
    assert set(found) == {WEIGHTS, f"{TOWER}/{WEIGHTS}"}
    assert card["weights_sha256"] == found, "the committed weights differ from the ones the card was made with"
    for name, digest in found.items():
        assert f"`{name}`: `{digest}`" in (RELEASE / CARD_MD).read_text()


def test_swapped_or_missing_weights_are_refused_before_anything_is_copied(tmp_path: Path) -> None:
    release = tmp_path / "release"
    shutil.copytree(RELEASE, release)
    card = read_card(release)
    data = bytearray((release / TOWER / WEIGHTS).read_bytes())
    data[-1] ^= 1  # one bit of the tower's last weight
    (release / TOWER / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match=rf"{TOWER}/{WEIGHTS}: weight file changed"):
        install_release(release, tmp_path / "a", card["recipe_hash"])
    assert not (tmp_path / "a").exists()
    (release / TOWER / WEIGHTS).unlink()
    with pytest.raises(ReleaseError, match=rf"{TOWER}/{WEIGHTS}: weight file missing"):
        install_release(release, tmp_path / "m", card["recipe_hash"])
    shutil.copy2(RELEASE / TOWER / WEIGHTS, release / TOWER / WEIGHTS)
    (release / "extra.safetensors").write_bytes(b"{}")
    with pytest.raises(ReleaseError, match="extra.safetensors: weight file not in the card"):
        install_release(release, tmp_path / "b", card["recipe_hash"])
    (release / "extra.safetensors").unlink()
    card.pop("weights_sha256")
    (release / CARD_JSON).write_text(json.dumps(card))
    with pytest.raises(ReleaseError, match="no weights_sha256 in the card"):
        install_release(release, tmp_path / "c", card["recipe_hash"])


def test_the_committed_tokenizer_is_the_one_the_code_trains(tmp_path: Path) -> None:
    """The recipe hash does not cover the tokenizer's corpus (every phrasing ``scout_data`` can write): a new
    phrasing or data kind that reaches the corpus changes every tokenizer ``make base`` builds."""
    import sentencepiece as spm

    from llava_twist.tiny import default_corpus, train_tokenizer

    model = get_recipe("full").model
    train_tokenizer(tmp_path, default_corpus(), model.vocab_size, model.coordinate_tokens)

    def pieces(folder: Path) -> list[str]:
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]

    assert pieces(tmp_path) == pieces(RELEASE), "the tokenizer corpus changed since the committed base was trained"


def test_the_demo_imports_the_release_instead_of_training_a_base() -> None:
    full = get_recipe("full")
    names = [s.name for s in build_stages(full)]
    assert "base" in names and not {"model", "warmup-look", "warmup-boxes"} & set(names)
    base = next(s for s in build_stages(full) if s.name == "base")
    assert base.code == (RELEASE / WEIGHTS,)  # new weights redo everything downstream
    trained = [s.name for s in build_stages(dataclasses.replace(full, shipped_base=None), base_only=True)]
    assert trained == ["model", "data", "warmup-look", "warmup-boxes", "base", "base-eval"]


def test_the_committed_base_loads_from_the_repository_root_and_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from llava_twist.serve.inference import generate, load_model
    from scout_data.sources.synthetic.config import add_arguments, config_from_args
    from scout_data.sources.synthetic.scenes import make_scene, render_scene

    monkeypatch.chdir(REPO)
    loaded = load_model(SHIPPED_BASE, device="cpu")
    world = get_recipe("full").base_data
    flags = world.synth_args(0)
    seed_at = flags.index("--seed")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([*flags[:seed_at], *flags[seed_at + 2:]])
    args.seed, args.out = 0, None
    cfg = config_from_args(args)
    rng = random.Random(5)
    image = render_scene(make_scene(rng, cfg), rng, cfg)
    out = generate(loaded, ["Please provide the bounding box coordinate of the region this sentence describes: "
                            "the circle."], [image])[0]
    assert out.text.startswith("[") and out.text.count(",") == 3, out.text


@pytest.fixture(scope="module")
def ci_release(ci_demo: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The ci base, released from a copy of the session's ci demo: its base stages are cached there (the same recipe
    part, the same stamps), so only the base's measurement runs."""
    root = tmp_path_factory.mktemp("release")
    shutil.copytree(ci_demo["out"], root / "build", symlinks=True)
    trained = (root / "build" / "work" / "models" / "base" / STAMP).read_text()
    card = build_base("ci", root / "build", root / "release", progress=False)
    assert (root / "build" / "work" / "models" / "base" / STAMP).read_text() == trained  # reused, not retrained
    return root / "release", card


def test_a_release_holds_a_llava_checkpoint_its_tower_and_its_card(ci_release: tuple[Path, dict]) -> None:
    release, card = ci_release
    assert card == read_card(release) and 0 < card["release_bytes"] <= MAX_RELEASE_BYTES
    assert card["recipe_hash"] == get_recipe("ci").base_hash() and card["training_seconds"] > 0
    assert {"config.json", WEIGHTS, "tokenizer.model", CARD_JSON, CARD_MD} <= {p.name for p in release.iterdir()}
    assert not {"trainer_state.json", "training_args.bin", ".done.json"} & {p.name for p in release.iterdir()}
    assert {"model.safetensors", "preprocessor_config.json"} <= {p.name for p in (release / TOWER).iterdir()}
    assert json.loads((release / "config.json").read_text())["mm_vision_tower"] == str(release.resolve() / TOWER)
    assert json.loads((release / TOWER / "config.json").read_text())["_name_or_path"] == str(release.resolve() / TOWER)
    for key in ("understanding", "one_shot", "image_reliance"):
        assert key in card["figures"]
    by_type = card["figures"]["understanding"]["by_type"]
    assert sum(t["n"] for t in by_type.values()) == card["figures"]["understanding"]["n"]
    card_md = (release / CARD_MD).read_text()
    assert "| understanding by question type | " in card_md
    tower = card["vision_pretraining"]["held_out"]  # the tower's read-outs travel with the weights
    assert 0.0 <= tower["shape_acc"] <= 1.0 and "vision tower (frozen)" in card_md
    assert not list(release.parent.glob(".release.*"))  # no temporary folder left
    assert set(card["weights_sha256"]) == {WEIGHTS, f"{TOWER}/{WEIGHTS}"}


def test_a_release_made_by_another_recipe_is_refused_and_a_matching_one_installs(
        ci_release: tuple[Path, dict], tmp_path: Path) -> None:
    release, card = ci_release
    with pytest.raises(ReleaseError, match="run `make base`"):
        install_release(release, tmp_path / "a", "0123456789abcdef")
    assert not (tmp_path / "a").exists()
    install_release(release, tmp_path / "b", card["recipe_hash"])
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["mm_vision_tower"] == str((tmp_path / "b" / TOWER).resolve())
    with pytest.raises(ReleaseError, match="no model card"):
        install_release(tmp_path / "nothing", tmp_path / "c", card["recipe_hash"])


def test_make_base_does_not_replace_a_release_unless_told(ci_release: tuple[Path, dict], capsys) -> None:
    release, _ = ci_release
    before = (release / WEIGHTS).read_bytes()
    assert main(["--profile", "ci", "--release", str(release), "--out", str(release.parent / "other")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (release / WEIGHTS).read_bytes() == before
    assert not (release.parent / "other").exists()

"""``llava_twist.eval.answer_loss``: teacher-forced answer loss split into box-coordinate and text tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from llava_twist.eval import answer_loss as al

sys.path.insert(0, str(Path(__file__).parent))
from twist_train_data import write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_dataset(tmp_path_factory.mktemp("answer-loss"), n_grounding=3, n_understanding=2)


def test_coordinate_positions_mark_digits_inside_boxes_by_place() -> None:
    N = None
    digits = ["▁Step", "▁", "2", ":", "▁[", "0", ".", "4", "5", ",", "▁", "1", ".", "0", "0", "]", "▁", "3"]
    assert al.coordinate_positions(digits) == [N, N, N, N, N, 0, N, 0, 0, N, N, 1, N, 1, 1, N, N, N]
    location_tokens = ["▁[", "0.45", ",", "▁", "0.05", ",", "▁", "0.50", ",", "▁", "0.10", "]", "▁and", "▁[", "1.00"]
    assert al.coordinate_positions(location_tokens) == [N, 0, N, N, 1, N, N, 2, N, N, 3, N, N, N, 0]


def test_split_losses_shift_labels_and_skip_ignored() -> None:
    class Pieces:
        def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
            return [{1: "▁[", 2: "7", 3: "]", 4: "▁a"}[i] for i in ids]

    labels = torch.tensor([[-100, 1, 2, 3, 4]])
    logits = torch.randn(1, 5, 6)
    out = al.split_losses(logits, labels, al.box_places(labels, Pieces()))
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor([1, 2, 3, 4]), reduction="none").tolist()
    assert out["coordinate"] == pytest.approx([ce[1]]) and out["x1"] == pytest.approx([ce[1]])
    assert out["text"] == pytest.approx([ce[0], ce[2], ce[3]])
    assert out["y1"] == out["x2"] == out["y2"] == []


def test_split_matches_llavas_own_loss_and_counts_every_digit_of_every_box(tiny_llava: Path,
                                                                           dataset: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    from playground.miniature.image_reliance import image_reliance

    data, images = dataset
    out = tmp_path / "loss.json"
    assert al.main(["--model-path", str(tiny_llava), "--model-class", "llava", "--data", str(data),
                    "--image-folder", str(images), "--batch-size", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    records = json.loads(data.read_text())
    boxes = sum(v["value"].count("[") for r in records for v in r["conversations"] if v["from"] == "gpt")
    assert result["records"] == len(records) == 5
    assert result["tokens"]["coordinate"] == boxes * 4 * 3  # four numbers of three digits each, one piece per digit
    assert all(result["tokens"][corner] == boxes * 3 for corner in al.CORNERS)
    mean = result["loss_per_token"]
    assert min(mean["coordinate"], mean["text"]) < mean["all"] < max(mean["coordinate"], mean["text"])
    assert "coordinate_mass" not in result  # digits: no token is one coordinate
    own = image_reliance(str(tiny_llava), str(data), str(images), num=5)["loss_own_images"]
    assert mean["all"] == pytest.approx(own, rel=1e-4)


def test_twist_routes(tiny_llava: Path, dataset: tuple[Path, Path]) -> None:
    data, images = dataset
    plain = al.answer_loss(str(tiny_llava), str(data), str(images), model_class="llava", num=3)
    frozen = al.answer_loss(str(tiny_llava), str(data), str(images), route="frozen", num=3)
    assert frozen == plain
    with pytest.raises(al.EvalError, match="--route 'both'"):
        al.answer_loss(str(tiny_llava), str(data), str(images), route="both")


def test_bad_input_names_the_file(tiny_llava: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,')
    assert al.main(["--model-path", str(tiny_llava), "--model-class", "llava", "--data", str(bad),
                    "--image-folder", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 1
    assert str(bad) in capsys.readouterr().err and not (tmp_path / "o.json").exists()


class LocationPieces:
    """A vocabulary with one token per coordinate, as the tiny models' ``coordinate_tokens``: ids 10-110 are
    ``0.00`` ... ``1.00``."""

    unk_token_id = 0
    words = {1: "▁[", 2: ",", 3: "]", 4: "▁a"}

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [10 + al.COORDINATES.index(t) if t in al.COORDINATES else self.unk_token_id for t in tokens]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [al.COORDINATES[i - 10] if i >= 10 else self.words[i] for i in ids]


def test_coordinate_mass_splits_each_coordinates_probability_by_distance() -> None:
    pieces = LocationPieces()
    values = al.coordinate_values(pieces)
    assert len(values) == 101 and values[10 + 27] == 27
    labels = torch.tensor([[-100, 1, 10 + 27, 2, 10 + 52, 3, 4, 10 + 50]])  # "[0.27, 0.52] a 0.50": the last, no box
    logits = torch.full((1, 8, 111), -30.0)
    x1 = {10 + 27: 0.5, 10 + 28: 0.2, 10 + 25: 0.1, 10 + 52: 0.15, 4: 0.05}  # predicted at the place before x1
    for token, p in x1.items():
        logits[0, 1, token] = torch.tensor(p).log()
    logits[0, 3, 10 + 52] = 10.0  # the second number: sure of it
    rows = al.coordinate_mass(logits, labels, values, al.box_places(labels, pieces))
    assert [r[0] for r in rows] == [0, 1]
    assert rows[0][1:] == pytest.approx((0.5, 0.3, 0.15, 0.05), abs=1e-6)  # 0.25 is 2 away: near; 0.52 far
    assert rows[1][1:] == pytest.approx((1.0, 0.0, 0.0, 0.0), abs=1e-6)
    losses = al.split_losses(logits, labels, al.box_places(labels, pieces))
    assert len(losses["text"]) == 5  # "[", ",", "]", "a" and the number outside a box
    assert [r[1] for r in rows] == pytest.approx([float(torch.tensor(-c).exp()) for c in losses["coordinate"]])
    summary = al.summarise(losses, 1, rows)["coordinate_mass"]
    assert summary["all"]["tokens"] == summary["first_corner"]["tokens"] == 2
    assert summary["all"]["near"] == pytest.approx(0.15) and summary["all"]["far"] == pytest.approx(0.075)


def test_coordinate_mass_needs_one_token_per_coordinate() -> None:
    class Digits(LocationPieces):
        def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
            return [self.unk_token_id for _ in tokens]

    assert al.coordinate_values(Digits()) == {}
    labels = torch.tensor([[-100, 1, 10, 3]])
    assert al.coordinate_mass(torch.randn(1, 4, 111), labels, {}, al.box_places(labels, Digits())) == []

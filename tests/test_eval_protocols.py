"""Named refexp scoring protocols: the same answers scored as we do and as lmms-eval does, on wide, tall and
square images, with every expected number worked out by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_twist.eval.eval_refexp import main, score_refexp
from llava_twist.eval.protocols import LMMS_EVAL_REC_PROMPT

# padded squares: 200 (the image 50 px down), 200 (50 px right), 100
WIDE, TALL, SQUARE = (200, 100), (100, 200), (100, 100)


def question(qid: int, size: tuple[int, int], gt: list[float]) -> dict:
    return {"question_id": qid, "image": f"{qid}.png", "text": "q", "width": size[0], "height": size[1],
            "box_frame": "padded", "bbox_xyxy_px": gt}


QUESTIONS = [
    question(1, WIDE, [50, 10, 100, 40]),
    question(2, WIDE, [20, 0, 100, 50]),
    question(3, TALL, [0, 100, 50, 200]),
    question(4, SQUARE, [10, 10, 60, 60]),
    question(5, SQUARE, [10, 10, 60, 60]),
    question(6, SQUARE, [10, 10, 60, 60]),
]
ANSWERS = [
    # padded: [50, 10, 100, 40], IoU 1.  original: [50, 30, 100, 45], IoU 500 / 1750 = 0.286.
    "Answer: [0.25, 0.30, 0.50, 0.45]",
    # ours takes the Answer box: padded [20, -50 -> 0, 100, 50] and original [20, 0, 100, 50], IoU 1 in both.
    # lmms-eval takes the first box, the step's: original [0, 25, 20, 35], padded [0, 0, 20, 20]: IoU 0.
    "Step 1: the cars [0.00, 0.25, 0.10, 0.35].\nAnswer: [0.10, 0.00, 0.50, 0.50]",
    # one-shot. padded (50 px right): [0, 100, 60, 200], IoU 5000 / 6000 = 0.833.
    # original: [25, 100, 55, 200], IoU 2500 / 5500 = 0.455.
    "[0.25, 0.50, 0.55, 1.00]",
    # pixels, not fractions: ours refuses to read it (a parse failure); lmms-eval reads it as fractions, IoU 0.
    "Answer: [120, 340, 560, 780]",
    # leading-dot decimals: ours reads [10, 10, 60, 60], IoU 1 (a square: both frames agree); lmms-eval's
    # pattern needs a digit before the point, so it finds no box.
    "Answer: [.10, .10, .60, .60]",
    "I cannot see it.",
]
IOU_1_ORIGINAL, IOU_3_PADDED, IOU_3_ORIGINAL = 500 / 1750, 5000 / 6000, 2500 / 5500
EXPECTED = {
    "ours": {"acc@0.5": 4 / 6, "acc@0.5[padded]": 4 / 6, "acc@0.5[original]": 2 / 6,
             "mean_iou": (1 + 1 + IOU_3_PADDED + 1) / 6, "parse_failure_rate": 2 / 6},
    "lmms-eval": {"acc@0.5": 0.0, "acc@0.5[padded]": 2 / 6, "acc@0.5[original]": 0.0,
                  "mean_iou": (IOU_1_ORIGINAL + IOU_3_ORIGINAL) / 6, "parse_failure_rate": 2 / 6},
}


def answers() -> list[dict]:
    return [{"question_id": q["question_id"], "text": a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]


@pytest.mark.parametrize("protocol", ["ours", "lmms-eval"])
def test_each_protocol_gives_its_worked_out_numbers(protocol: str) -> None:
    result = score_refexp(QUESTIONS, answers(), protocol=protocol)
    for key, want in EXPECTED[protocol].items():
        assert result["metrics"][key] == pytest.approx(want), key
    assert result["protocol"]["name"] == protocol
    assert result["protocol"]["frame"] == ("padded" if protocol == "ours" else "original")


def test_the_reasons_name_what_went_wrong() -> None:
    ours = score_refexp(QUESTIONS, answers())["failures"]["examples"]
    assert any("4: broken box (coordinates not normalised" in e for ex in ours.values() for e in ex), ours
    assert any("6: no answer line" in e for ex in ours.values() for e in ex), ours
    lmms = score_refexp(QUESTIONS, answers(), protocol="lmms-eval")["failures"]["by_reason"]
    assert sum(n for reason, n in lmms.items() if reason.startswith("no four-number box")) == 2


def test_box_frame_override_moves_ours_but_not_lmms_eval() -> None:
    original = score_refexp(QUESTIONS, answers(), box_frame="original")
    assert original["metrics"]["acc@0.5"] == pytest.approx(2 / 6)
    assert original["protocol"]["frame"] == "original"
    lmms = score_refexp(QUESTIONS, answers(), box_frame="padded", protocol="lmms-eval")
    assert lmms["metrics"]["acc@0.5"] == 0.0


def test_command_line_writes_the_protocol_into_the_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    qf, af = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qf.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    af.write_text("".join(json.dumps(a) + "\n" for a in answers()))
    assert main(["--question-file", str(qf), "--answers-file", str(af), "--protocol", "lmms-eval"]) == 0
    result = json.loads((tmp_path / "a.result.json").read_text())
    assert result["protocol"]["name"] == "lmms-eval" and result["metrics"]["acc@0.5[padded]"] == pytest.approx(2 / 6)
    assert "protocol: lmms-eval" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--question-file", str(qf), "--answers-file", str(af), "--protocol", "refcoco"])


def test_lmms_eval_prompt_is_their_rec_prompt() -> None:
    prompt = LMMS_EVAL_REC_PROMPT.format(expression="man in red")
    assert prompt.startswith("Bounding box coordinates are specified in the format (top-left x, top-left y")
    assert prompt.endswith("describes: man in red")

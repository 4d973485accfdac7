"""What the steps are worth: the deciding step asked after the reference chain's steps (right, or with swapped
boxes), read from the chain the model completes."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from llava_twist.serve.loading import load_model
from llava_twist.serve.result import result_from_text
from playground.miniature.step_value import BOX_TEXT, answer_after, contexts, pick_right, steps_before_pick

RELATION = ("Step 1: the circles [0.27, 0.52, 0.48, 0.73], [0.53, 0.03, 0.70, 0.20].\n"
            "Step 2: the reference object [0.78, 0.28, 0.95, 0.45].\n"
            "Step 3: the one it asks for: [0.27, 0.52, 0.48, 0.73].\nAnswer: [0.27, 0.52, 0.48, 0.73]")
SUPERLATIVE = ("Step 1: the yellow objects [0.28, 0.28, 0.45, 0.45], [0.77, 0.02, 0.98, 0.23].\n"
               "Step 2: the one it asks for: [0.28, 0.28, 0.45, 0.45].\nAnswer: [0.28, 0.28, 0.45, 0.45]")
ONE_STEP = "Step 1: the red square [0.02, 0.02, 0.23, 0.23].\nAnswer: [0.02, 0.02, 0.23, 0.23]"


def question(qid: str, box: list[float]) -> dict:
    return {"question_id": qid, "image": "scene.png", "text": "Find it. Answer step by step.", "bbox_xyxy_px": box,
            "width": 64, "height": 64, "box_frame": "padded", "expression_type": "relation"}


def record(chain: str) -> dict:
    return {"conversations": [{"from": "human", "value": "<image>\nFind it."}, {"from": "gpt", "value": chain}]}


def test_the_steps_end_where_the_deciding_step_writes_its_box() -> None:
    assert steps_before_pick(RELATION).endswith("Step 3: the one it asks for:")
    assert "[0.78, 0.28, 0.95, 0.45]" in steps_before_pick(RELATION)
    assert steps_before_pick(ONE_STEP) is None


def test_swapped_steps_keep_their_words_and_take_other_chains_boxes() -> None:
    questions = [question("a", [17, 33, 31, 47]), question("b", [18, 18, 29, 29]), question("c", [1, 1, 15, 15])]
    records = {"a": record(RELATION), "b": record(SUPERLATIVE), "c": record(ONE_STEP)}
    got = contexts(questions, records, seed=0)
    assert set(got["right_steps"]) == set(got["swapped_boxes"]) == set(got["no_steps"]) == {"a", "b"}  # c: no pick
    assert got["no_steps"]["a"] == "Step 1: the one it asks for:"
    for qid, other in (("a", "b"), ("b", "a")):
        right, swapped = got["right_steps"][qid], got["swapped_boxes"][qid]
        assert BOX_TEXT.sub("[]", right) == BOX_TEXT.sub("[]", swapped)
        assert set(BOX_TEXT.findall(swapped)) <= set(BOX_TEXT.findall(got["right_steps"][other]))
    assert contexts(questions, records, seed=0) == got


def test_the_deciding_steps_box_is_judged_not_the_answers() -> None:
    q = question("a", [17, 33, 31, 47])  # the box [0.27, 0.52, 0.48, 0.73] of a 64 px image
    steps = steps_before_pick(RELATION)
    right_then_wrong = result_from_text("[0.27, 0.52, 0.48, 0.73].\nAnswer: [0.53, 0.03, 0.70, 0.20]", (64, 64),
                                        "padded")
    wrong_then_right = result_from_text("[0.53, 0.03, 0.70, 0.20].\nAnswer: [0.27, 0.52, 0.48, 0.73]", (64, 64),
                                        "padded")
    assert pick_right(q, steps, right_then_wrong)
    assert not pick_right(q, steps, wrong_then_right)
    assert not pick_right(q, steps, None)


def test_each_question_is_answered_after_its_steps(tiny_llava: Path, tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), "white").save(tmp_path / "scene.png")
    questions = [question("a", [17, 33, 31, 47]), question("b", [18, 18, 29, 29]), question("c", [1, 1, 15, 15])]
    steps = contexts(questions, {"a": record(RELATION), "b": record(SUPERLATIVE), "c": record(ONE_STEP)})
    loaded = load_model(str(tiny_llava), device="cpu", model_class="llava")
    got = answer_after(loaded, questions, steps["right_steps"], tmp_path, batch=2, progress=False)
    assert set(got) == {"a", "b"}
    assert all(isinstance(r.text, str) for r in got.values())

"""``playground.miniature.chain_misses``: where answer and step boxes land among a scene's objects."""

from __future__ import annotations

from playground.miniature.chain_misses import chain_misses

OBJECTS = [  # 64 px scene, pixel boxes
    {"shape": "circle", "colour": "red", "size": "large", "box_xyxy_px": [1.0, 1.0, 15.0, 15.0]},
    {"shape": "circle", "colour": "blue", "size": "medium", "box_xyxy_px": [34.0, 2.0, 45.0, 13.0]},
    {"shape": "square", "colour": "red", "size": "medium", "box_xyxy_px": [50.0, 50.0, 61.0, 61.0]},
]
RED_CIRCLE, BLUE_CIRCLE, RED_SQUARE = "[0.02, 0.02, 0.23, 0.23]", "[0.53, 0.03, 0.70, 0.20]", "[0.78, 0.78, 0.95, 0.95]"
EMPTY = "[0.30, 0.60, 0.45, 0.75]"


def question(k: int) -> dict:
    return {"question_id": f"g/q{k}", "text": "Find the large circle.", "width": 64, "height": 64,
            "box_frame": "padded", "bbox_xyxy_px": OBJECTS[0]["box_xyxy_px"]}


def test_answers_and_steps_are_set_against_every_object_of_the_scene() -> None:
    texts = [
        f"Step 1: the large red circle {RED_CIRCLE}.\nStep 2: the blue circle {BLUE_CIRCLE}.\nAnswer: {RED_CIRCLE}",
        f"Step 1: the red circle {BLUE_CIRCLE}.\nAnswer: {BLUE_CIRCLE}",  # names one object, boxes another
        f"Step 1: the square {EMPTY}.\nStep 2: the circles {RED_CIRCLE} {BLUE_CIRCLE}.\nAnswer: {EMPTY}",
        "Answer: nothing here",
        # a repeated step number: each step keeps its own box (the second, boxless, is not counted)
        f"Step 1: the blue circle {BLUE_CIRCLE}.\nStep 1: the red circle.\nStep 2: the red square {EMPTY}.\n"
        f"Answer: {BLUE_CIRCLE}",
        f"Answer: {RED_SQUARE}",
    ]
    questions = [question(k) for k in range(len(texts) + 1)]  # the last one has no answer: not counted
    answers = [{"question_id": f"g/q{k}", "text": t} for k, t in enumerate(texts)]
    records = {q["question_id"]: {"source_ids": {"objects": OBJECTS}} for q in questions}
    records.pop("g/q5")  # a record without its scene's objects is not counted either
    got = chain_misses(questions, answers, records)
    assert got["n"] == 5
    assert got["answer"] == {"right": 1, "another_object": 2, "no_object": 2}
    # one-box steps only (the two-box and boxless steps are left out): 2 + 1 + 1 + 2 = 6 boxes, 4 on an object,
    # 3 on the one named
    assert got["steps"] == {"boxes": 6, "on_an_object": 4, "on_the_named_object": 3}

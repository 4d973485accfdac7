"""``playground.miniature.chain_misses``: each step of a model's chain judged by its role (anchor, candidates,
deciding step) against its scene's objects, consistency, and where the answer lands."""

from __future__ import annotations

import pytest

from playground.miniature.chain_misses import anchor_phrase, chain_misses, named

OBJECTS = [  # 64 px scene, pixel boxes
    {"shape": "circle", "colour": "red", "size": "large", "box_xyxy_px": [1.0, 1.0, 15.0, 15.0]},
    {"shape": "circle", "colour": "blue", "size": "medium", "box_xyxy_px": [34.0, 2.0, 45.0, 13.0]},
    {"shape": "square", "colour": "red", "size": "medium", "box_xyxy_px": [50.0, 50.0, 61.0, 61.0]},
]
RED_CIRCLE, BLUE_CIRCLE, RED_SQUARE = "[0.02, 0.02, 0.23, 0.23]", "[0.53, 0.03, 0.70, 0.20]", "[0.78, 0.78, 0.95, 0.95]"
EMPTY = "[0.30, 0.60, 0.45, 0.75]"
# "the circle left of the blue circle" is the red circle; its anchor is the blue circle
RELATION = ("the circle left of the blue circle", OBJECTS[0]["box_xyxy_px"], "relation")
SUPERLATIVE = ("the largest circle", OBJECTS[0]["box_xyxy_px"], "superlative")


def run(cases: list[tuple[tuple[str, list[float], str], str]]) -> dict:
    questions = [{"question_id": f"g/q{k}", "text": f"Find {e}.", "expression": e, "expression_type": t,
                  "width": 64, "height": 64, "box_frame": "padded", "bbox_xyxy_px": box}
                 for k, ((e, box, t), _) in enumerate(cases)]
    answers = [{"question_id": f"g/q{k}", "text": text} for k, (_, text) in enumerate(cases)]
    records = {q["question_id"]: {"source_ids": {"objects": OBJECTS}} for q in questions}
    return chain_misses(questions, answers, records)


def test_a_right_chain_is_right_at_every_step() -> None:
    got = run([
        (RELATION, f"Step 1: the circle {RED_CIRCLE}.\nStep 2: the reference object {BLUE_CIRCLE}.\n"
                   f"Step 3: the one it asks for: {RED_CIRCLE}.\nAnswer: {RED_CIRCLE}"),
        (SUPERLATIVE, f"Step 1: the circles {RED_CIRCLE}, {BLUE_CIRCLE}.\nStep 2: the one it asks for: {RED_CIRCLE}."
                      f"\nAnswer: {RED_CIRCLE}"),
    ])
    a = got["all"]
    assert a["n"] == 2 and a["answer"]["right"]["rate"] == 1.0
    assert a["step_accuracy"] == {"k": 5, "n": 5, "rate": 1.0}
    assert {r: s["k"] for r, s in a["by_role"].items()} == {"anchor": 1, "candidates": 2, "decide": 2}
    assert a["consistency"]["rate"] == a["anchor_found"]["rate"] == a["target_among_steps"]["rate"] == 1.0
    assert got["relation"]["n"] == got["superlative"]["n"] == 1


def test_each_role_fails_on_its_own_mistake() -> None:
    a = run([
        # the anchor's box on another object
        (RELATION, f"Step 1: the circle {RED_CIRCLE}.\nStep 2: the reference object {RED_SQUARE}.\n"
                   f"Step 3: the one it asks for: {RED_CIRCLE}.\nAnswer: {RED_CIRCLE}"),
        # one candidate missing, and the decision on it
        (SUPERLATIVE, f"Step 1: the circles {BLUE_CIRCLE}.\nStep 2: the largest: {BLUE_CIRCLE}.\n"
                      f"Answer: {BLUE_CIRCLE}"),
        # right steps, an answer that does not copy the deciding step
        (SUPERLATIVE, f"Step 1: the circles {RED_CIRCLE}, {BLUE_CIRCLE}.\nStep 2: the largest: {RED_CIRCLE}.\n"
                      f"Answer: {EMPTY}"),
    ])["all"]
    assert a_roles(a) == {"anchor": (0, 1), "candidates": (2, 3), "decide": (2, 3)}
    assert a["consistency"] == {"k": 2, "n": 3, "rate": pytest.approx(2 / 3)}
    assert a["anchor_found"]["k"] == 0
    assert (a["answer"]["right"]["k"], a["answer"]["on_another_object"]["k"], a["answer"]["on_no_object"]["k"]) == (
        1, 1, 1)
    assert a["answer_among_steps"]["k"] == 2  # the empty answer is no step's object


def test_a_worded_anchor_is_the_anchor_wherever_it_stands() -> None:
    for text in (f"Step 1: the blue circle {BLUE_CIRCLE}.\nStep 2: the circle {RED_CIRCLE}.\n"
                 f"Step 3: left of the blue circle: {RED_CIRCLE}.\nAnswer: {RED_CIRCLE}",
                 f"Step 1: the circle {RED_CIRCLE}.\nStep 2: the blue circle {BLUE_CIRCLE}.\n"
                 f"Step 3: the circle left of the blue circle: {RED_CIRCLE}.\nAnswer: {RED_CIRCLE}"):
        a = run([(RELATION, text)])["all"]
        assert a_roles(a) == {"anchor": (1, 1), "candidates": (1, 1), "decide": (1, 1)}
        assert a["anchor_found"]["k"] == 1


def a_roles(a: dict) -> dict:
    return {r: (s["k"], s["n"]) for r, s in a["by_role"].items()}


def test_terse_steps_name_one_object_each() -> None:
    got = run([(SUPERLATIVE, f"Step 1: the large red circle {RED_CIRCLE}.\nStep 2: the red circle {BLUE_CIRCLE}.\n"
                             f"Answer: {RED_CIRCLE}")])["all"]
    assert a_roles(got) == {"anchor": (0, 0), "candidates": (1, 2), "decide": (0, 0)}  # names one, boxes another
    assert got["consistency"]["k"] == 0 and got["answer_among_steps"]["k"] == 1


def test_answers_without_steps_or_records_are_counted_where_they_can_be() -> None:
    questions = [{"question_id": f"g/q{k}", "text": "Find the largest circle.", "expression": "the largest circle",
                  "width": 64, "height": 64, "box_frame": "padded", "bbox_xyxy_px": OBJECTS[0]["box_xyxy_px"]}
                 for k in range(3)]
    answers = [{"question_id": "g/q0", "text": "Answer: nothing here"}, {"question_id": "g/q1", "text": RED_SQUARE}]
    records = {"g/q0": {"source_ids": {"objects": OBJECTS}}, "g/q1": {"source_ids": {"objects": OBJECTS}},
               "g/q2": {"source_ids": {"objects": OBJECTS}}}
    got = chain_misses(questions, answers, records)["all"]  # q2 has no answer: not counted
    assert got["n"] == 2 and got["answer"]["on_no_object"]["k"] == 1 and got["answer"]["on_another_object"]["k"] == 1
    assert got["step_accuracy"]["n"] == 0 and got["consistency"]["n"] == 0


def test_words_of_the_grammar() -> None:
    assert named("the large red circles ") == {"large", "red", "circle"}
    assert named("the objects ") == set() and named("left of it") is None
    assert anchor_phrase("the triangle nearest to the red square") == "the red square"
    assert anchor_phrase("the largest red object") is None

"""The one chain parser: lenient on numbers, explicit about problems, never raises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scout_data.parse import parse_boxes, parse_chain

CHAIN = (
    "Step 1: The question asks for the red circle.\n"
    "Step 2: I see these candidates: red circle [0.10, 0.20, 0.30, 0.40] and red circle [0.5,0.5,0.7,0.9].\n"
    "Step 3: The left one is [0.10, 0.20, 0.30, 0.40].\n"
    "Answer: [0.10, 0.20, 0.30, 0.40]"
)


def test_parses_a_well_formed_chain():
    c = parse_chain(CHAIN)
    assert c.problems == [] and c.has_answer_line
    assert [s.index for s in c.steps] == [1, 2, 3]
    assert c.steps[1].boxes_xyxy_norm == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.7, 0.9)]
    assert c.steps[0].text == "The question asks for the red circle."
    assert c.answer_boxes_xyxy_norm == [(0.1, 0.2, 0.3, 0.4)]
    assert len(c.all_boxes_xyxy_norm()) == 4


def test_number_forms_and_count_answers():
    assert parse_boxes("[0, 0, 1, 1] [ 0.1 , 0.25,0.333 ,.5] [0.1234, 0.2, 0.3, 0.4]") == [
        (0.0, 0.0, 1.0, 1.0),
        (0.1, 0.25, 0.333, 0.5),
        (0.1234, 0.2, 0.3, 0.4),
    ]
    c = parse_chain(
        "Step 1: Count.\nAnswer: 3 [0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6]"
    )
    assert c.answer_words == "3" and len(c.answer_boxes_xyxy_norm) == 3 and not c.problems


def test_region_answer_without_answer_line_uses_every_box():
    c = parse_chain("[0.12, 0.30, 0.45, 0.80]")
    assert c.answer_boxes_xyxy_norm == [(0.12, 0.3, 0.45, 0.8)] and c.problems == [] and not c.steps
    assert parse_chain("a cat").problems == ["no answer line"]


def problems_of(text: str) -> list[str]:
    return parse_chain(text).problems


def test_each_problem_is_reported():
    assert any(p.startswith("no answer line") for p in problems_of("Step 1: hello [0.1, 0.1, 0.2, 0.2]."))
    assert any(p.startswith("unparseable box") for p in problems_of("Answer: [0.1, 0.2, 0.3]"))
    assert any(p.startswith("unparseable box") for p in problems_of("Answer: [0.1, 0.2, 0.3, 0.4, 0.5]"))
    assert any(p.startswith("unterminated box") for p in problems_of("Answer: [0.1, 0.2, 0.3"))
    out = parse_chain("Answer: [-0.1, 0.2, 1.3, 0.4]")
    assert any(p.startswith("box outside [0, 1]") for p in out.problems)
    assert out.answer_boxes_xyxy_norm == [(0.0, 0.2, 1.0, 0.4)]
    assert any(p.startswith("degenerate box") for p in problems_of("Answer: [0.3, 0.2, 0.3, 0.4]"))
    assert any(p.startswith("degenerate box") for p in problems_of("Answer: [0.5, 0.2, 0.3, 0.4]"))
    assert any(p.startswith("steps out of order") for p in problems_of("Step 1: a.\nStep 3: b.\nAnswer: x"))
    assert any(p.startswith("steps out of order") for p in problems_of("Step 2: a.\nAnswer: x"))
    assert any(
        p.startswith("step after the answer") for p in problems_of("Step 1: a.\nAnswer: x\nStep 2: b.")
    )
    assert any(p.startswith("several answer lines") for p in problems_of("Answer: x\nAnswer: y"))
    assert any(p.startswith("text before Step 1") for p in problems_of("Sure!\nStep 1: a.\nAnswer: x"))


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_any_text(text):
    c = parse_chain(text)
    assert isinstance(c.problems, list)
    for b in c.all_boxes_xyxy_norm():
        assert all(0.0 <= v <= 1.0 for v in b)


fragments = st.sampled_from(
    [
        "Step ",
        "Answer:",
        ":",
        "1",
        "2",
        "99999999999999999999",
        "0.",
        ".5",
        "-",
        "[",
        "]",
        ",",
        " ",
        "\n",
        "0.25",
        "1.0",
        "[0.1, 0.2, 0.3, 0.4]",
        "Step 1: ",
        "Answer: ",
        "e5",
        "\u00e9",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(fragments, max_size=60))
def test_never_raises_on_chain_like_text(parts):
    text = "".join(parts)
    c = parse_chain(text)
    assert all(0.0 <= v <= 1.0 for b in c.all_boxes_xyxy_norm() for v in b)

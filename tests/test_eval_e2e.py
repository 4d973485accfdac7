"""Inference helpers and the evaluation runner on the tiny LLaVA: batching, routes, scores, retention."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor

from llava_twist.eval import eval_localization, eval_refexp, eval_retention, model_grounding
from llava_twist.serve.inference import (
    GenerationSettings,
    TokenLogprobRecorder,
    generate,
    load_model,
    prepare_inputs,
    span_scores,
    stream_generate,
)
from llava_twist.serve.result import answer_box_spans

QUERIES = [
    "Where is the red circle left of the blue square? Answer step by step.",
    "What is in the image?",
    "Find all the circles. Answer step by step.",
    "How many triangles are there?",
]


@pytest.fixture(scope="module")
def loaded(tiny_llava):
    return load_model(str(tiny_llava), device="cpu")


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (80 + 30 * i, 60 + 17 * i), (200, 30 * i, 40)) for i in range(len(QUERIES))]


class ForceText(LogitsProcessor):
    """Makes ``generate`` write the given token ids (then EOS), whatever the model prefers."""

    def __init__(self, ids: list[int], eos: int) -> None:
        self.ids, self.eos, self.start = ids, eos, None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        step = input_ids.shape[1] - self.start
        token = self.ids[step] if step < len(self.ids) else self.eos
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced


def force_output(monkeypatch, loaded, text: str) -> None:
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    original = loaded.model.generate

    def generate_forced(*args, **kwargs):
        kwargs["logits_processor"] = list(kwargs.get("logits_processor") or []) + [
            ForceText(ids, loaded.tokenizer.eos_token_id)]
        return original(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", generate_forced)


def test_left_padding_batched_equals_one_by_one(loaded, images):
    settings = GenerationSettings(max_new_tokens=12)
    inputs = prepare_inputs(loaded, QUERIES, images)
    mask = inputs["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padded
    batched = generate(loaded, QUERIES, images, settings)
    single = [generate(loaded, [q], [im], settings)[0] for q, im in zip(QUERIES, images, strict=True)]
    assert [r.text for r in batched] == [r.text for r in single]
    assert all(r.text for r in batched)
    assert len({r.text for r in batched}) > 1  # the prompts and images do matter
    assert [r.router_prob for r in batched] == pytest.approx([r.router_prob for r in single])
    assert loaded.model.config.tokenizer_padding_side == "right"  # restored after the call


def test_route_reported_is_the_prefill_decision(loaded, images):
    router = loaded.model.get_model().twist_router.net[-1]
    saved = router.weight.detach().clone()
    try:
        with torch.no_grad():
            router.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
        one = generate(loaded, QUERIES[:2], images[:2], GenerationSettings(max_new_tokens=1))
        many = generate(loaded, QUERIES[:2], images[:2], GenerationSettings(max_new_tokens=6))
        assert [r.router_prob for r in many] == pytest.approx([r.router_prob for r in one], abs=1e-6)
        assert one[0].router_prob != pytest.approx(one[1].router_prob)
        forced = generate(loaded, QUERIES[:1], images[:1], GenerationSettings(max_new_tokens=2, route="grounding"))
        assert forced[0].route == "grounding" and forced[0].route_forced
    finally:
        with torch.no_grad():
            router.weight.copy_(saved)


def test_token_logprobs_match_transition_scores(loaded, images):
    inputs = prepare_inputs(loaded, QUERIES[:2], images[:2])
    recorder = TokenLogprobRecorder()
    out = loaded.model.generate(
        inputs["input_ids"], images=inputs["images"], attention_mask=inputs["attention_mask"], do_sample=False,
        max_new_tokens=6, logits_processor=[recorder], output_scores=True, return_dict_in_generate=True,
        twist_route="frozen", pad_token_id=loaded.tokenizer.eos_token_id)
    expected = loaded.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    assert torch.allclose(recorder.finish(out.sequences), expected, atol=1e-5)
    assert recorder.generated(out.sequences).shape == (2, len(out.scores))


def test_span_scores_geometric_mean_of_box_tokens(loaded):
    tok = loaded.tokenizer
    text = "Step 1: see [0.10, 0.20, 0.30, 0.40].\nAnswer: [0.10, 0.20, 0.30, 0.40], [0.50, 0.50, 0.60, 0.60]"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True).strip() == text
    spans = answer_box_spans(text)
    assert [text[s:e] for s, e in spans] == ["[0.10, 0.20, 0.30, 0.40]", "[0.50, 0.50, 0.60, 0.60]"]
    # tokens that end before the first answer box get a tiny probability, every other token 0.25:
    # if the spans were mapped to the wrong tokens, a score would not be exactly 0.25
    ends = [len(tok.decode(ids[: i + 1], skip_special_tokens=True).strip()) for i in range(len(ids))]
    logprobs = [-50.0 if end <= spans[0][0] else math.log(0.25) for end in ends]
    assert span_scores(tok, ids, logprobs, text, spans) == pytest.approx([0.25, 0.25])
    # and a low-probability token inside the second box lowers only the second score
    inside = next(i for i, end in enumerate(ends) if end > spans[1][0] + 3)
    logprobs[inside] = math.log(0.25) - 2.0
    first, second = span_scores(tok, ids, logprobs, text, spans)
    assert first == pytest.approx(0.25) and second < 0.25
    assert answer_box_spans("Step 1: [0.1, 0.2, 0.3, 0.4]") == []  # no answer line, no answer boxes


def test_forced_answer_boxes_in_original_pixels_with_scores(loaded, monkeypatch):
    text = "Step 1: The red circle is at [0.10, 0.30, 0.30, 0.60].\nAnswer: [0.10, 0.30, 0.30, 0.60]"
    force_output(monkeypatch, loaded, text)
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    result = generate(loaded, [QUERIES[0]], [image], GenerationSettings(max_new_tokens=60))[0]
    assert result.text == text and result.miss_reason is None
    assert result.answer_boxes_xyxy_px == [pytest.approx((20.0, 10.0, 60.0, 70.0))]
    assert [b.label for b in result.boxes] == ["Step 1", "Answer"]
    assert len(result.answer_box_scores) == 1 and 0 < result.answer_box_scores[0] <= 1
    original = generate(loaded, [QUERIES[0]], [image], GenerationSettings(max_new_tokens=60, box_frame="original"))
    assert original[0].answer_boxes_xyxy_px == [pytest.approx((20.0, 30.0, 60.0, 60.0))]
    pieces = list(stream_generate(loaded, QUERIES[0], image, GenerationSettings(max_new_tokens=60)))
    assert len(pieces) > 2 and all(isinstance(p, str) for p in pieces[:-1])
    assert "".join(pieces[:-1]).strip() == text
    assert pieces[-1].answer_boxes_xyxy_px == result.answer_boxes_xyxy_px and pieces[-1].route == "frozen"


def write_questions(folder: Path, questions: list[dict]) -> Path:
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


@pytest.fixture()
def refexp_questions(tmp_path, images):
    (tmp_path / "img").mkdir()
    questions = []
    for i, im in enumerate(images):
        im.save(tmp_path / "img" / f"{i}.png")
        questions.append({"question_id": f"q{i}", "image": f"{i}.png", "text": QUERIES[i], "width": im.width,
                          "height": im.height, "box_frame": "padded", "bbox_xyxy_px": [5, 5, 40, 40],
                          "gt_boxes_xyxy_px": [[5, 5, 40, 40]], "category": "circle", "answer": "Yes"})
    return write_questions(tmp_path, questions), tmp_path / "img"


def run_answers(tiny_llava, qfile, images, answers, *extra) -> int:
    return model_grounding.main([
        "--model-path", str(tiny_llava), "--question-file", str(qfile), "--image-folder", str(images),
        "--answers-file", str(answers), "--max_new_tokens", "8", "--device", "cpu", *extra])


def test_runner_chunks_resume_and_scorers(tiny_llava, refexp_questions, tmp_path):
    qfile, images = refexp_questions
    answers = tmp_path / "answers" / "merge.jsonl"
    chunks = [tmp_path / "answers" / f"2_{i}.jsonl" for i in range(2)]
    for i, chunk in enumerate(chunks):
        assert run_answers(tiny_llava, qfile, images, chunk, "--num-chunks", "2", "--chunk-idx", str(i),
                           "--batch-size", "2") == 0
    rows = [json.loads(line) for c in chunks for line in c.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert rows[0]["prompt"] == QUERIES[0] and rows[0]["model_id"] == "llava-v1.5-tiny"
    assert rows[0]["metadata"]["route"] == "frozen" and 0 < rows[0]["metadata"]["router_prob"] < 0.5
    answers.write_text("".join(c.read_text() for c in chunks))

    # resume: a torn last line is dropped and its question answered again; the others are kept
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    assert run_answers(tiny_llava, qfile, images, answers, "--batch-size", "4") == 0
    resumed = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in resumed] == ["q0", "q1", "q2", "q3"]
    assert [r["answer_id"] for r in resumed[:3]] == [r["answer_id"] for r in rows[:3]]
    assert resumed[3]["text"] == rows[3]["text"]  # batch of 1 after resuming == batch of 2 before

    assert eval_refexp.main(["--question-file", str(qfile), "--answers-file", str(answers)]) == 0
    result = json.loads((tmp_path / "answers" / "merge.result.json").read_text())
    assert result["n"] == 4 and result["metrics"]["parse_failure_rate"] == 1.0  # an untrained model: no boxes
    assert sum(result["failures"]["by_reason"].values()) == 4
    assert eval_localization.main(["--question-file", str(qfile), "--answers-file", str(answers),
                                   "--result-file", str(tmp_path / "loc.json")]) == 0
    assert json.loads((tmp_path / "loc.json").read_text())["metrics"]["recall@0.5"] == 0.0


def test_runner_refuses_missing_images_and_other_models_answers(tiny_llava, refexp_questions, tmp_path, capsys):
    qfile, images = refexp_questions
    assert run_answers(tiny_llava, qfile, tmp_path / "nowhere", tmp_path / "a.jsonl") == 2
    assert "image(s) not found" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question_id": "q0", "text": "x", "model_id": "someone-else"}) + "\n")
    assert run_answers(tiny_llava, qfile, images, other) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_answers_made_otherwise_are_never_resumed_and_other_files_never_touched(
    tiny_llava, refexp_questions, tmp_path, capsys
):
    qfile, images = refexp_questions
    answers = tmp_path / "a.jsonl"
    assert run_answers(tiny_llava, qfile, images, answers, "--route", "frozen", "--batch-size", "4") == 0
    frozen = answers.read_text()
    assert run_answers(tiny_llava, qfile, images, answers, "--route", "grounding") == 2
    err = capsys.readouterr().err
    assert "route was 'frozen', now 'grounding'" in err and "stale" in err
    assert run_answers(tiny_llava, qfile, images, answers, "--route", "frozen", "--max_new_tokens", "9") == 2
    assert "max_new_tokens was 8, now 9" in capsys.readouterr().err
    assert answers.read_text() == frozen
    assert run_answers(tiny_llava, qfile, images, answers, "--route", "frozen") == 0  # same settings: resumed
    assert "resuming" in capsys.readouterr().out and answers.read_text() == frozen
    assert run_answers(tiny_llava, qfile, images, answers, "--route", "grounding", "--overwrite") == 0
    assert all(json.loads(line)["metadata"]["settings"]["route"] == "grounding"
               for line in answers.read_text().splitlines())

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline two\n")
    assert run_answers(tiny_llava, qfile, images, notes) == 2
    assert "line 1 is not an answer this command wrote" in capsys.readouterr().err
    assert notes.read_text() == "my notes\nline two\n"


def test_another_model_under_the_same_folder_name_is_not_resumed(tiny_llava, other_tiny_llava, refexp_questions,
                                                                   tmp_path, capsys):
    qfile, images = refexp_questions
    answers = tmp_path / "a.jsonl"
    assert tiny_llava.name == other_tiny_llava.name  # same model_id: only the weights tell them apart
    assert run_answers(tiny_llava, qfile, images, answers, "--batch-size", "4") == 0
    assert run_answers(other_tiny_llava, qfile, images, answers) == 2
    assert "weights was" in capsys.readouterr().err


def test_resume_reads_lines_as_json_writes_them(tmp_path):
    settings = {"route": "auto"}
    row = {"question_id": "q0", "prompt": "p", "text": "a\u2028b\x85c", "metadata": {"settings": settings}}
    path = tmp_path / "a.jsonl"
    path.write_bytes((json.dumps(row, ensure_ascii=False) + "\n").encode() + b'{"question_id": "q1", "te'
                     + "\u00e9".encode()[:1])  # killed inside a line, inside a character
    assert model_grounding.resume_answers(str(path), settings, {"q0": "p"}, overwrite=False) == {"q0"}
    assert json.loads(path.read_text(encoding="utf-8")) == row  # the torn line is gone, the answer kept whole


def test_refexp_questions_can_be_asked_with_llavas_or_lmms_evals_prompt(tiny_llava, tmp_path, capsys):
    image = tmp_path / "img" / "0.png"
    image.parent.mkdir()
    Image.new("RGB", (64, 48), (200, 200, 200)).save(image)
    q = {"question_id": "r0", "image": "0.png", "text": "Where is the red circle? Answer step by step.",
         "expression": "the red circle", "width": 64, "height": 48, "bbox_xyxy_px": [5, 5, 20, 20]}
    qfile = write_questions(tmp_path, [q])
    answers = tmp_path / "llava.jsonl"
    assert run_answers(tiny_llava, qfile, image.parent, answers, "--prompt", "llava") == 0
    row = json.loads(answers.read_text())
    assert row["prompt"] == "Please provide the bounding box coordinate of the region this sentence describes: " \
                            "the red circle."
    assert run_answers(tiny_llava, qfile, image.parent, tmp_path / "lmms.jsonl", "--prompt", "lmms-eval") == 0
    assert json.loads((tmp_path / "lmms.jsonl").read_text())["prompt"].endswith("describes: the red circle")
    assert run_answers(tiny_llava, qfile, image.parent, answers, "--prompt", "scout") == 2
    assert "prompt was 'llava', now 'scout'" in capsys.readouterr().err
    del q["expression"]
    (tmp_path / "bare").mkdir()
    bare = write_questions(tmp_path / "bare", [q])
    assert run_answers(tiny_llava, bare, image.parent, tmp_path / "x.jsonl", "--prompt", "llava") == 2
    assert "needs its 'expression'" in capsys.readouterr().err


def test_retention_base_llava_vs_converted_twist_is_identical(tiny_llava, refexp_questions, tmp_path):
    qfile, images = refexp_questions
    base, twist = tmp_path / "base.jsonl", tmp_path / "twist.jsonl"
    assert run_answers(tiny_llava, qfile, images, base, "--model-class", "llava", "--batch-size", "4",
                       "--model-id", "base") == 0
    assert run_answers(tiny_llava, qfile, images, twist, "--route", "auto", "--batch-size", "4") == 0
    assert all(json.loads(line)["metadata"]["route"] is None for line in base.read_text().splitlines())
    out = tmp_path / "retention.json"
    assert eval_retention.main(["--question-file", str(qfile), "--base-answers", str(base),
                                "--twist-answers", str(twist), "--result-file", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 4
    assert result["metrics"]["identical_rate"] == 1.0
    assert result["metrics"]["frozen_route_rate"] == 1.0 and result["routes"] == {"frozen": 4}
    assert result["by_group"]["circle"]["acc_delta"] == 0.0

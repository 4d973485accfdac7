"""Evaluation metrics on hand-made answers with known results: frames, degenerate boxes, unparseable text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llava_twist.eval import eval_refexp, summary
from llava_twist.eval.common import EvalError, iou_matrix, read_jsonl
from llava_twist.eval.eval_grounded_caption import score_grounded_caption
from llava_twist.eval.eval_localization import score_localization
from llava_twist.eval.eval_refexp import score_refexp
from llava_twist.eval.eval_retention import score_retention
from llava_twist.eval.scout_questions import convert
from scout_data.boxes import box_xyxy_px_to_norm, format_box

W, H = 200, 100  # non-square: the padded frame is a 200x200 square with the image 50 px down


def box_text(box_px, frame="padded", w=W, h=H) -> str:
    return format_box(box_xyxy_px_to_norm(box_px, w, h, frame))


def refexp_q(qid, box, frame="padded", w=W, h=H, subset="s"):
    return {"question_id": qid, "image": "x.png", "text": "q", "width": w, "height": h, "box_frame": frame,
            "bbox_xyxy_px": list(box), "subset": subset}


def ans(qid, text, **meta):
    return {"question_id": qid, "text": text, "metadata": meta}


def test_iou_matrix_known_values_and_degenerate_boxes():
    iou = iou_matrix([(0, 0, 10, 10), (0, 0, 10, 0)], [(5, 0, 15, 10), (0, 0, 10, 10), (3, 3, 3, 3)])
    assert iou[0, 0].item() == pytest.approx(50 / 150)
    assert iou[0, 1].item() == 1.0
    assert iou[1].tolist() == [0.0, 0.0, 0.0]  # zero-area prediction
    assert iou[0, 2].item() == 0.0  # zero-area ground truth: 0, not NaN


def test_refexp_padded_frame_maps_back_to_original_pixels():
    gt = (20.0, 10.0, 60.0, 70.0)
    # in the padded square the box sits 50 px lower: y 60..120 of 200 -> [0.10, 0.30, 0.30, 0.60]
    assert box_text(gt) == "[0.10, 0.30, 0.30, 0.60]"
    qs = [refexp_q(1, gt)]
    r = score_refexp(qs, [ans(1, "Step 1: It is there [0.10, 0.30, 0.30, 0.60].\nAnswer: [0.10, 0.30, 0.30, 0.60]")])
    assert r["metrics"]["acc@0.5"] == 1.0
    assert r["metrics"]["mean_iou"] == pytest.approx(1.0)
    assert r["rows"][0]["pred_xyxy_px"] == pytest.approx(list(gt))
    # the same text read in the original frame lands elsewhere: y 30..60 of 100 -> IoU 10*... = low
    wrong = score_refexp(qs, [ans(1, "Answer: [0.10, 0.30, 0.30, 0.60]")], box_frame="original")
    assert wrong["rows"][0]["pred_xyxy_px"] == pytest.approx([20.0, 30.0, 60.0, 60.0])
    assert wrong["metrics"]["mean_iou"] == pytest.approx(30 * 40 / (60 * 40))
    assert wrong["metrics"]["acc@0.5"] == 1.0  # 0.5 exactly counts


def test_refexp_original_frame_questions_and_threshold():
    gt = (0.0, 0.0, 100.0, 100.0)
    qs = [refexp_q("a", gt, frame="original"), refexp_q("b", gt, frame="original")]
    answers = [ans("a", "Answer: [0.00, 0.00, 0.50, 1.00]"),  # exact box
               ans("b", "Answer: [0.00, 0.00, 0.20, 1.00]")]  # 40x100 inside 100x100: IoU 0.4
    r = score_refexp(qs, answers)
    assert r["metrics"]["acc@0.5"] == 0.5
    assert r["metrics"]["mean_iou"] == pytest.approx((1.0 + 0.4) / 2)
    assert r["metrics"]["parse_failure_rate"] == 0.0


def test_refexp_unparseable_missing_and_degenerate_are_misses_with_reasons():
    gt = (20.0, 10.0, 60.0, 70.0)
    qs = [refexp_q(i, gt) for i in range(5)] + [refexp_q(9, (5, 5, 5, 30))]
    answers = [
        ans(0, "I think it is the red one."),  # no box at all
        ans(1, "Step 1: the box is [0.1, 0.3, 0.3].\nAnswer: somewhere"),  # malformed box, no answer box
        ans(2, "Answer: [0.10, 0.30, 0.10, 0.60]"),  # zero width
        ans(3, "Answer: [0.10, 0.30, 0.30, 0.60]"),  # correct
        # question 4 has no answer line in the answers file
    ]
    r = score_refexp(qs, answers)
    m = r["metrics"]
    assert r["n"] == 5 and m["invalid_ground_truth"] == 1
    assert m["acc@0.5"] == pytest.approx(1 / 5)
    assert m["parse_failure_rate"] == pytest.approx(3 / 5)
    reasons = r["failures"]["by_reason"]
    assert reasons["no answer line"] == 1
    assert any(k.startswith("no box in the answer (unparseable box") for k in reasons)
    assert any(k.startswith("degenerate predicted box") for k in reasons)
    assert any(k.startswith("no answer for this question") for k in reasons)
    assert any(k.startswith("degenerate ground-truth box") for k in reasons)
    assert [row["iou"] for row in r["rows"]][:4] == [0.0, 0.0, 0.0, pytest.approx(1.0)]


def test_refexp_out_of_image_box_is_clamped_and_groups_reported():
    gt = (150.0, 0.0, 200.0, 100.0)
    qs = [refexp_q(1, gt, subset="a"), refexp_q(2, gt, subset="b")]
    # padded frame: x 0.75..1.2 (clamped by the parser to 1.0) and y 0.25..0.75 -> exactly the ground truth
    r = score_refexp(qs, [ans(1, "Answer: [0.75, 0.25, 1.20, 0.75]"), ans(2, "nothing")])
    assert r["rows"][0]["pred_xyxy_px"] == pytest.approx(list(gt))
    assert r["by_group"]["a"]["acc@0.5"] == 1.0 and r["by_group"]["b"]["parse_failure_rate"] == 1.0


def test_refexp_cli_writes_result_json(tmp_path):
    qf, af = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qf.write_text(json.dumps(refexp_q(1, (20, 10, 60, 70))) + "\n")
    af.write_text(json.dumps(ans(1, "Answer: [0.10, 0.30, 0.30, 0.60]")) + "\n")
    assert eval_refexp.main(["--question-file", str(qf), "--answers-file", str(af)]) == 0
    result = json.loads((tmp_path / "a.result.json").read_text())
    assert result["benchmark"] == "refexp" and result["metrics"]["acc@0.5"] == 1.0 and "rows" not in result
    af.write_text("{not json\n")
    assert eval_refexp.main(["--question-file", str(qf), "--answers-file", str(af)]) == 2
    with pytest.raises(EvalError, match="a.jsonl:1: malformed JSON"):
        read_jsonl(str(af))


def test_grounded_caption_recall_precision_and_text_match():
    man, dog = (10.0, 10.0, 50.0, 90.0), (120.0, 40.0, 190.0, 90.0)
    q = {"question_id": 1, "width": W, "height": H, "box_frame": "original",
         "phrases": [{"phrase": "A man", "boxes_xyxy_px": [man]},
                     {"phrase": "a brown dog", "boxes_xyxy_px": [dog]},
                     {"phrase": "two cats", "boxes_xyxy_px": [(0, 0, 10, 10), (60, 0, 80, 20)]}]}
    text = (f"Answer: A man {box_text(man, 'original')} walks a puppy {box_text(dog, 'original')} "
            f"next to a tree {box_text((60, 0, 80, 20), 'original')} and [0.0, 0.0, 0.01, 0.01].")
    r = score_grounded_caption([q], [ans(1, text)])
    m = r["metrics"]
    assert m["phrase_recall@0.5"] == 1.0  # the cats phrase is recalled through its second box
    assert m["phrase_recall_text@0.5"] == pytest.approx(1 / 3)  # only "man" is named before its box
    assert m["box_precision@0.5"] == pytest.approx(3 / 4)
    miss = score_grounded_caption([q], [ans(1, "A man walks a dog.")])
    assert miss["metrics"]["phrase_recall@0.5"] == 0.0 and miss["metrics"]["parse_failure_rate"] == 1.0
    assert miss["failures"]["by_reason"] == {"no answer line": 1}


def loc_q(qid, boxes, category="circle"):
    return {"question_id": qid, "width": W, "height": H, "box_frame": "original",
            "gt_boxes_xyxy_px": [list(b) for b in boxes], "category": category}


def test_localization_perfect_partial_and_scores():
    a, b = (10.0, 10.0, 50.0, 50.0), (100.0, 20.0, 160.0, 80.0)
    qs = [loc_q(1, [a, b]), loc_q(2, [])]
    both = f"Answer: {box_text(a, 'original')}, {box_text(b, 'original')}"
    perfect = score_localization(qs, [ans(1, both), ans(2, "Answer: there are none.")])
    m = perfect["metrics"]
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert m["recall@0.5"] == 1.0 and m["precision@0.5"] == 1.0 and m["count_accuracy"] == 1.0
    assert m["parse_failure_rate"] == 0.0 and m["score_source"] == "rank"

    # one false positive ranked above the true box: AP50 drops to 0.5 with rank scores,
    # back to 1.0 when the token probabilities rank the false one last
    fp = (0.0, 60.0, 20.0, 90.0)
    text = f"Answer: {box_text(fp, 'original')}, {box_text(a, 'original')}"
    ranked = score_localization([loc_q(1, [a])], [ans(1, text)])
    assert ranked["metrics"]["AP50"] == pytest.approx(0.5, abs=0.01)
    scored = score_localization([loc_q(1, [a])], [ans(1, text, answer_box_scores=[0.1, 0.9])])
    assert scored["metrics"]["AP50"] == pytest.approx(1.0) and scored["metrics"]["score_source"] == "token_prob"
    assert scored["metrics"]["recall@0.5"] == 1.0 and scored["metrics"]["precision@0.5"] == 0.5


def test_localization_no_detections_and_unparseable():
    qs = [loc_q(1, [(10, 10, 50, 50)])]
    r = score_localization(qs, [ans(1, "I cannot see any [0.1, 0.2")])
    m = r["metrics"]
    assert m["AP"] == 0.0 and m["recall@0.5"] == 0.0 and m["parse_failure_rate"] == 1.0
    assert m["precision@0.5"] is None
    assert sum(r["failures"]["by_reason"].values()) == 1


def test_retention_identical_rate_accuracy_delta_and_routes():
    qs = [{"question_id": i, "text": "q", "answer": gt, "category": "pope"} for i, gt in enumerate(["Yes", "No", "No"])]
    qs.append({"question_id": 3, "text": "q", "category": "conv"})
    base = [ans(0, "Yes"), ans(1, "Yes"), ans(2, "No."), ans(3, "A cat.")]
    twist = [ans(0, "Yes", route="frozen", router_prob=0.02), ans(1, "No", route="grounding", router_prob=0.93),
             ans(2, "No.", route="frozen", router_prob=0.1), ans(3, "A cat.", route="frozen", router_prob=0.3)]
    r = score_retention(qs, base, twist)
    m = r["metrics"]
    assert m["identical_rate"] == 0.75 and m["identical_rate_frozen_route"] == 1.0
    assert m["identical_rate_grounding_route"] == 0.0 and m["frozen_route_rate"] == 0.75
    pope = r["by_group"]["pope"]
    assert pope["acc_base"] == pytest.approx(2 / 3) and pope["acc_twist"] == 1.0
    assert pope["acc_delta"] == pytest.approx(1 / 3)
    assert "acc_delta" not in r["by_group"]["conv"]
    assert r["routes"] == {"frozen": 3, "grounding": 1}
    assert r["router_prob_histogram"]["0.0-0.1"] == 1 and r["router_prob_histogram"]["0.9-1.0"] == 1
    with pytest.raises(EvalError, match="no question has an answer in both"):
        score_retention(qs, [], twist)


def test_scout_questions_from_synthetic_test_split(tmp_path):
    from scout_data.cli import main as scout_main

    data = tmp_path / "synth"
    assert scout_main(["synth", "--out", str(data), "--num", "60", "--splits", "test:1.0", "--random-aspect",
                       "--quiet", "--kinds", "refexp,find_all,count,grounded_caption,region,qa"]) == 0
    counts = convert(str(data / "test.json"), str(tmp_path / "q"))
    assert set(counts) == {"refexp", "grounded_caption", "localization", "vqa"}
    records = {r["id"]: r for r in json.loads((data / "test.json").read_text())}
    # the training-time answer as a model answer scores perfectly (after 2-decimal rounding)
    for bench, fn, key in [("refexp", score_refexp, "acc@0.5"), ("grounded_caption", score_grounded_caption,
                           "phrase_recall@0.5"), ("localization", score_localization, "recall@0.5")]:
        qs = read_jsonl(str(tmp_path / "q" / f"{bench}.jsonl"))
        assert len(qs) == counts[bench]
        oracle = [ans(q["question_id"], records[q["question_id"]]["conversations"][1]["value"]) for q in qs]
        assert fn(qs, oracle)["metrics"][key] == 1.0, bench
        for q in qs:
            Image.open(data / "images" / q["image"]).verify()
            assert "<image>" not in q["text"] and q["box_frame"] == "padded"
    for q in read_jsonl(str(tmp_path / "q" / "refexp.jsonl")):  # what --prompt llava / lmms-eval ask about
        record = records[q["question_id"]]
        assert q["expression"] and (record["query"] if record["kind"] == "region" else q["expression"]) in q["text"]
    vqa = read_jsonl(str(tmp_path / "q" / "vqa.jsonl"))
    assert all(q["answer"] for q in vqa)
    with pytest.raises(EvalError, match="not found"):
        convert(str(tmp_path / "none.json"), str(tmp_path / "q"))


def test_summary_table_and_chart(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.result.json").write_text(json.dumps(
        {"benchmark": "refexp", "name": "ckpt refcoco_val", "n": 10, "headline": ["acc@0.5"],
         "protocol": {"name": "lmms-eval", "frame": "original"},
         "metrics": {"acc@0.5": 0.5, "mean_iou": 0.41, "invalid_ground_truth": 0}}))
    (tmp_path / "y.result.json").write_text(json.dumps(
        {"benchmark": "localization", "name": "ckpt coco", "n": 4, "headline": ["AP"],
         "metrics": {"AP": 0.25, "AP50": None, "score_source": "rank"}}))
    (tmp_path / "other.json").write_text(json.dumps({"not": "a result"}))
    md_path, png_path, n = summary.summarize(str(tmp_path), str(tmp_path / "out" / "summary"))
    assert n == 2
    table = Path(md_path).read_text()
    assert "| result | benchmark | protocol | n | AP | acc@0.5 | mean_iou | invalid_ground_truth |" in table
    assert "| ckpt coco | localization |  | 4 | 0.2500 |  |  |  |" in table
    assert "| ckpt refcoco_val | refexp | lmms-eval | 10 |  | 0.5000 | 0.4100 | 0 |" in table
    assert png_path and Image.open(png_path).format == "PNG"

"""Functions of the offline tasks: LLaVA question JSONL (``llava_twist.eval.common``) read by lmms-eval.

Images are ``image`` relative to the task's ``image_folder`` (``lmms_eval_specific_kwargs``). ``twist_rec`` is
lmms-eval's RefCOCO REC task (``refcoco_bbox_rec_*``) on these records: its prompt, its parse (the first
``[a, b, c, d]``, else ``[0, 0, 0, 0]``) and metrics, called from ``lmms_eval.tasks.refcoco.utils_rec``; the ground
truth is ``bbox_xyxy_px`` normalised by the original image's ``width`` and ``height``, as theirs.
``twist_understanding`` scores short answers by normalised exact match (``eval_retention.is_correct``).
"""

from __future__ import annotations

import os
from typing import Any

from lmms_eval.tasks.refcoco.utils_rec import COCO_REC_METRICS, parse_float_sequence_within
from PIL import Image

from llava_twist.eval.eval_retention import is_correct
from llava_twist.eval.prompts import question_prompt


def doc_to_visual(doc: dict[str, Any], task_kwargs: dict[str, Any] | None = None) -> list[Image.Image]:
    folder = (task_kwargs or {}).get("image_folder") or ""
    with Image.open(os.path.join(folder, doc["image"])) as image:
        return [image.convert("RGB")]


def rec_doc_to_text(doc: dict[str, Any], task_kwargs: dict[str, Any] | None = None) -> str:
    return question_prompt(doc, "lmms-eval")


def rec_doc_to_target(doc: dict[str, Any]) -> list[float]:
    return normalised_gt(doc)


def normalised_gt(doc: dict[str, Any]) -> list[float]:
    """``bbox_xyxy_px`` as fractions of the original image, lmms-eval's frame for RefCOCO's ground truth."""
    x1, y1, x2, y2 = doc["bbox_xyxy_px"]
    w, h = doc["width"], doc["height"]
    return [x1 / w, y1 / h, x2 / w, y2 / h]


def rec_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    """lmms-eval's ``refcoco_bbox_rec_process_result`` on a LLaVA question record."""
    pred = parse_float_sequence_within(results[0] if results else "")
    data = {"answer": doc["expression"], "pred": pred, "ann_id": doc["question_id"], "bbox": normalised_gt(doc)}
    return {f"refcoco_{metric}": data for metric in COCO_REC_METRICS}


def understanding_doc_to_text(doc: dict[str, Any], task_kwargs: dict[str, Any] | None = None) -> str:
    return doc["text"]


def understanding_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": float(is_correct(results[0] if results else "", doc["answer"]))}

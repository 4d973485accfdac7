"""``grid.png``: held-out test scenes x models, each model's boxes and steps over the ground truth."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from llava_twist.eval.common import answers_by_id, read_jsonl
from playground.miniature.answering import HEADLINE_SET, answers_file, heldout_records, question_dir
from playground.miniature.formatting import dig, label
from playground.miniature.runner import Layout
from scout_data.preview import draw_chain

MAX_CELL_CHARS = 400


def grid_questions(questions: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` held-out refexp questions, simple and hard in turn."""
    simple = [q for q in questions if q.get("difficulty") == "simple"]
    hard = [q for q in questions if q.get("difficulty") != "simple"]
    picked: list[dict[str, Any]] = []
    while len(picked) < n and (simple or hard):
        for pool in (simple, hard):
            if pool and len(picked) < n:
                picked.append(pool.pop(0))
    return picked


def cell_image(image: Any, text: str, gt_box_px: list[float] | None, size: int, frame: str) -> Any:
    """The image scaled to ``size`` px wide, the ground-truth box (black inside white), the chain's boxes and
    steps (``scout_data.preview.draw_chain``) on it."""
    w, h = image.size
    scale = size / w
    big = image.convert("RGB").resize((size, max(1, round(h * scale))), Image.NEAREST)
    if gt_box_px is not None:
        x1, y1, x2, y2 = (v * scale for v in gt_box_px)
        draw = ImageDraw.Draw(big)
        draw.rectangle([x1 - 2, y1 - 2, max(x1, x2 - 1) + 2, max(y1, y2 - 1) + 2], outline=(255, 255, 255), width=2)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=(0, 0, 0), width=1)
    return draw_chain(big, text[:MAX_CELL_CHARS], frame)


def draw_grid(layout: Layout, names: list[str], metrics: dict[str, Any], scenes: int, size: int, out: Path) -> int:
    """Rows: test scenes; columns: ground truth, then each model under its chosen prompt. Returns the number of
    rows drawn."""
    questions = read_jsonl(str(question_dir(layout) / f"refexp-{HEADLINE_SET}.jsonl"), "questions")
    picked = grid_questions(questions, scenes)
    records = {f"{HEADLINE_SET}/{r['id']}": r for r in heldout_records(layout, HEADLINE_SET)}
    answers = {n: answers_by_id(read_jsonl(str(answers_file(layout, n, metrics[n]["prompt"])), "answers"))
               for n in names}
    grid: list[list[tuple[str, Any]]] = []
    for q in picked:
        with Image.open(layout.data / q["image"]) as im:
            image = im.convert("RGB")
        rec = records.get(q["question_id"], {})
        gt_text = (rec.get("conversations") or [{}, {}])[1].get("value", "")
        frame = q.get("box_frame", "padded")
        gt_title = f"ground truth ({q.get('difficulty', '?')})\n" + "\n".join(textwrap.wrap(q["text"], 32))
        row = [(gt_title, cell_image(image, gt_text, q.get("bbox_xyxy_px"), size, frame))]
        for n in names:
            text = str(answers[n].get(q["question_id"], {}).get("text", ""))
            right = dig(metrics, n, "headline", "correct", q["question_id"])
            verdict = "" if right is None else f"\n{'right' if right else 'wrong'}"
            title = f"{label(n)}, {metrics[n]['prompt']}{verdict}"
            row.append((title, cell_image(image, text, q.get("bbox_xyxy_px"), size, frame)))
        grid.append(row)
    height = max((cell.size[1] for row in grid for _, cell in row), default=size)
    rows, cols = max(1, len(grid)), 1 + len(names)
    fig = Figure(figsize=(1.9 * cols, 1.9 * rows * height / size + 0.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(grid):
        for c, (title, cell) in enumerate(row):
            padded = Image.new("RGB", (size, height), (255, 255, 255))
            padded.paste(cell, (0, 0))
            axes[r][c].imshow(padded)
            axes[r][c].set_title(title, fontsize=7)
    if not picked:
        axes[0][0].text(0.5, 0.5, "no held-out refexp questions", ha="center", va="center")
    fig.suptitle("Held-out scenes: each model's boxes and steps; ground truth boxed black in white", fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out)
    return len(picked)

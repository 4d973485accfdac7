"""One markdown table (and a PNG chart) of every evaluation result JSON found under a folder.

    python -m llava_twist.eval.summary ./playground/data/eval --out ./playground/data/eval/summary

A result file is any ``*.json`` holding ``benchmark``, ``n`` and ``metrics`` (what the ``eval_*`` scripts
write, ``*.result.json`` by default), or lmms-eval's ``<date>_results.json`` (one result per task, protocol
``lmms-eval``). Rows: results, sorted by benchmark and name, with the scoring protocol a refexp result follows
(``ours`` or ``lmms-eval``: their numbers are not comparable); columns: every numeric metric present (blank where a
benchmark lacks it). The chart shows each result's headline metrics (all in [0, 1]).

Where lmms-eval results of ``--model llava`` (the base) and ``--model llava_twist`` share a task, a retention table
follows: per task, the headline metric of the base and of each TWIST run, the difference and TWIST's share of the
base's score (``scripts/eval/lmms_eval.sh`` runs both on LLaVA-1.5's suite and on RefCOCO/+/g REC).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from llava_twist.eval.common import EvalError, atomic_write_text
from scout_data.inputs import read_input


def result_paths(folder: str) -> list[str]:
    """Every ``*.json`` under ``folder``, recursively, each file once: symlinked folders are not entered (a link to
    itself or a parent would loop), a file reached by two names counts once; hidden files and folders are skipped."""
    found: dict[str, str] = {}
    for root, dirs, names in os.walk(folder):  # followlinks=False: a symlinked folder is listed, never walked
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.endswith(".json") and not name.startswith(".") and os.path.isfile(path):
                found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


# lmms-eval metrics reported as a task's headline, first found wins (else the task's first metric)
LMMS_HEADLINES = ("refcoco_ACC@0.5", "exact_match", "pope_f1_score", "mme_perception_score", "gpt_eval_score")
LMMS_BASE, LMMS_TWIST = "llava", "llava_twist"  # lmms-eval's --model of LLaVA-1.5 and of TWIST


def is_lmms_eval_results(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("results"), dict) and isinstance(data.get("config"), dict)
            and "lmms_eval_version" in data)


def _model_label(config: dict[str, Any]) -> str:
    """``model: checkpoint folder[, twist_route=...]`` from lmms-eval's ``config`` of a run."""
    args = dict(part.split("=", 1) for part in str(config.get("model_args") or "").split(",") if "=" in part)
    label = f"{config.get('model')}: {os.path.basename(args.get('pretrained', '').rstrip('/'))}"
    return label + (f", twist_route={args['twist_route']}" if "twist_route" in args else "")


def lmms_eval_results(data: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """One result per task of an lmms-eval results file (metrics without their ``,filter`` suffix or stderrs)."""
    out = []
    for task, values in data["results"].items():
        if not isinstance(values, dict):
            raise EvalError(f"{path}: an lmms-eval results file whose task {task!r} holds no metrics")
        metrics = {key.split(",", 1)[0]: value for key, value in values.items()
                   if "_stderr" not in key and isinstance(value, int | float) and not isinstance(value, bool)}
        headline = next((m for m in LMMS_HEADLINES if m in metrics), next(iter(metrics), None))
        samples = (data.get("n-samples") or {}).get(task) or {}
        out.append({"benchmark": task, "name": _model_label(data["config"]), "n": int(samples.get("effective", 0)),
                    "metrics": metrics, "headline": [headline] if headline else [], "protocol": {"name": "lmms-eval"},
                    "lmms_model": data["config"].get("model"), "lmms_date": str(data.get("date", ""))})
    return out


def retention_table(results: Sequence[dict[str, Any]]) -> str:
    """Base vs TWIST per lmms-eval task (see the module docstring); empty when no task has both."""
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        if r.get("lmms_model") in (LMMS_BASE, LMMS_TWIST) and r.get("headline"):
            by_task.setdefault(r["benchmark"], {}).setdefault(r["lmms_model"], []).append(r)
    lines = []
    for task, runs in sorted(by_task.items()):
        if LMMS_BASE not in runs or LMMS_TWIST not in runs:
            continue
        base = max(runs[LMMS_BASE], key=lambda r: r["lmms_date"])
        metric = base["headline"][0]
        for twist in sorted(runs[LMMS_TWIST], key=lambda r: r["name"]):
            ours, theirs = twist["metrics"].get(metric), base["metrics"][metric]
            delta = None if ours is None else ours - theirs
            share = "" if ours is None or not theirs else f"{100 * ours / theirs:.1f}%"
            cells = [task, metric, _text(base["name"]), _cell(theirs), _text(twist["name"]), _cell(ours),
                     "" if delta is None else f"{delta:+.4f}", share]
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    header = ["task", "metric", "base", "base score", "TWIST", "TWIST score", "TWIST - base", "TWIST / base"]
    return ("\n## lmms-eval: base vs TWIST\n\n| " + " | ".join(header) + " |\n|" + "|".join(["---"] * len(header))
            + "|\n" + "\n".join(lines) + "\n")


def find_results(folder: str) -> list[dict[str, Any]]:
    """Every result JSON under ``folder`` (recursively, see :func:`result_paths`), each with its ``path``; an
    lmms-eval results file gives one result per task (:func:`lmms_eval_results`)."""
    out = []
    for path in result_paths(folder):
        try:
            data = json.loads(read_input(path))
        except (OSError, ValueError, RecursionError):
            continue
        if is_lmms_eval_results(data):
            for result in lmms_eval_results(data, path):
                result["path"] = os.path.relpath(path, folder)
                out.append(result)
        elif isinstance(data, dict) and {"benchmark", "n", "metrics"} <= set(data):
            if problem := result_problem(data):
                raise EvalError(f"{path}: a result file whose {problem}")
            data["path"] = os.path.relpath(path, folder)
            out.append(data)
    return sorted(out, key=lambda r: (str(r["benchmark"]), str(r.get("name", "")), r["path"]))


def result_problem(data: dict[str, Any]) -> str | None:
    """The first field of a result (a JSON with ``benchmark``, ``n`` and ``metrics``) that a scorer would not have
    written, or None."""
    checks = {
        "benchmark": isinstance(data["benchmark"], str),
        "n": isinstance(data["n"], int) and not isinstance(data["n"], bool) and data["n"] >= 0,
        "metrics": isinstance(data["metrics"], dict),
        "headline": isinstance(data.get("headline", []), list) and all(
            isinstance(k, str) for k in data.get("headline", [])),
        "name": isinstance(data.get("name", ""), str),
        "protocol": isinstance(data.get("protocol", {}), dict | str),
    }
    bad = next((k for k, ok in checks.items() if not ok), None)
    return None if bad is None else f"{bad!r} is {json.dumps(data.get(bad))[:60]}"


def _numeric(metrics: dict[str, Any]) -> dict[str, int | float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _cell(value: int | float | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _text(value: Any) -> str:
    """A table cell holding ``value`` as text: ``|`` escaped and line breaks made spaces, so a row stays a row."""
    return " ".join(str(value).replace("\\", "\\\\").replace("|", "\\|").splitlines())


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in results:
        for key in [*(r.get("headline") or []), *_numeric(r["metrics"])]:
            if key not in columns and key in _numeric(r["metrics"]):
                columns.append(key)
    header = ["result", "benchmark", "protocol", "n", *map(_text, columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in results:
        values = _numeric(r["metrics"])
        protocol = r.get("protocol") if isinstance(r.get("protocol"), dict) else {}
        cells = [_text(v) for v in (r.get("name") or r["path"], r["benchmark"], protocol.get("name", ""), r["n"])]
        cells += [_cell(values.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def headline_points(results: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
    points = []
    for r in results:
        values = _numeric(r["metrics"])
        for key in r.get("headline") or []:
            if key in values and 0.0 <= values[key] <= 1.0:
                points.append((f"{r.get('name') or r['path']} [{r['benchmark']}] {key}", values[key]))
    return points


def write_chart(results: Sequence[dict[str, Any]], path: str) -> bool:
    """A horizontal bar chart of the headline metrics; False when there is nothing to plot."""
    points = headline_points(results)
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.4 * len(points) + 1.2))
    labels, values = zip(*points, strict=True)
    ax.barh(range(len(points)), values, color="tab:blue")
    ax.set_yticks(range(len(points)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    for i, v in enumerate(values):
        ax.text(min(v + 0.01, 0.9), i, f"{v:.3f}", va="center", fontsize=8)
    ax.set_title("llava-twist evaluation: headline metrics")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


HEADER = "# Evaluation summary\n\n"


def is_summary(path: str) -> bool:
    """Whether ``path`` is a summary this command wrote (one a rerun may replace)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(len(HEADER)) == HEADER
    except (OSError, ValueError):
        return False


def summarize(folder: str, out_prefix: str) -> tuple[str, str | None, int]:
    """Write ``<out_prefix>.md`` and ``<out_prefix>.png``; returns their paths (png None if empty) and the count."""
    results = find_results(folder)
    body = markdown_table(results) + retention_table(results) if results else f"No result files under {folder}.\n"
    md = HEADER + body
    md_path = out_prefix + ".md"
    atomic_write_text(md_path, md)
    png_path = out_prefix + ".png"
    return md_path, png_path if write_chart(results, png_path) else None, len(results)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llava_twist.eval.summary", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", help="folder searched (recursively) for result JSON files")
    p.add_argument("--out", default=None, help="output prefix (default: <folder>/summary)")
    p.add_argument("--overwrite", action="store_true", help="replace a <prefix>.md that is not a summary")
    args = p.parse_args(argv)
    if not os.path.isdir(args.folder):
        print(f"error: {args.folder}: not a folder", file=sys.stderr)
        return 2
    prefix = args.out or os.path.join(args.folder, "summary")
    from scout_data.output import OutputError, check_output

    try:
        check_output(prefix + ".md", [], args.overwrite, "--out", made_here=is_summary)
        check_output(prefix + ".png", [], args.overwrite, "--out", made_here=lambda _: is_summary(prefix + ".md"))
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        md_path, png_path, n = summarize(args.folder, prefix)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open(md_path, encoding="utf-8") as f:
        print(f.read())
    print(f"{n} results; wrote {md_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

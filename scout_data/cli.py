"""``python -m scout_data`` / ``scout-data``: generate, mix, validate, count and preview SCOUT data.

Generating commands (``synth coco refcoco flickr30k vg``) share ``--out --seed --frame --resume
--shard-size``; each source adds its own flags (``scout_data.sources.<name>.add_arguments``), and the
source module is imported only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from scout_data.boxes import DEFAULT_FRAME, FRAMES
from scout_data.inputs import check_input
from scout_data.limits import MAX_MIX_RECORDS, MIX_RATIO, MIX_REPLAY_FRACTION, REPORT, SHARD_SIZE, OneLineParser
from scout_data.output import (
    IMAGE_FORMATS,
    RUN_FILE,
    OutputError,
    atomic_write,
    atomic_write_text,
    check_output,
    dumps_records,
    format_summary,
    image_format,
    output_lock,
    prepare_out_dir,
    write_dataset,
)
from scout_data.validate import DataError, load_conversations, validate_file

PROG = "scout-data"
RUN_ONLY_FLAGS = {"out", "resume", "quiet", "shard_size", "no_check_images", "workers"}  # they change no record
SOURCE_COMMANDS = {
    "synth": ("synthetic", "synthetic scenes (no download needed)"),
    "coco": ("coco", "COCO instances: find-all, counting, relations"),
    "refcoco": ("refcoco", "RefCOCO / RefCOCO+ / RefCOCOg referring expressions"),
    "flickr30k": ("flickr30k", "Flickr30k Entities grounded captions"),
    "vg": ("vg", "Visual Genome regions and objects"),
}


class CliError(Exception):
    pass


def _load_source(name: str) -> Any:
    try:
        return importlib.import_module(f"scout_data.sources.{name}")
    except ImportError as exc:
        raise CliError(f"source {name!r} is not available: {exc}") from None


def _add_generate_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (DIR/<split>.json, DIR/summary.json)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--frame",
        choices=FRAMES,
        default=DEFAULT_FRAME,
        help="box frame of the text: padded (what LLaVA sees with image_aspect_ratio=pad) or original",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue into a non-empty --out, skipping written ids"
    )
    g.add_argument("--shard-size", type=SHARD_SIZE, default=5000,
                   help=f"records per shard while writing ({SHARD_SIZE})")
    g.add_argument("--no-check-images", action="store_true", help="do not open each image before writing")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv else None
    modules: dict[str, Any] = {}
    for cmd, (module, help_) in SOURCE_COMMANDS.items():
        p = sub.add_parser(cmd, help=help_)
        _add_generate_flags(p)
        if cmd == wanted:
            modules[cmd] = _load_source(module)
            modules[cmd].add_arguments(p)

    p = sub.add_parser("mix", help="merge SCOUT JSON with LLaVA instruction JSON (replay), tagging task",
                       description=f"A mix holds at most {MAX_MIX_RECORDS} records (it is built in memory).")
    p.add_argument("--scout", nargs="+", required=True, help="SCOUT JSON file(s)")
    p.add_argument("--replay", required=True, help="LLaVA instruction JSON (e.g. llava_v1_5_mix665k.json)")
    p.add_argument("--out", required=True, help="output JSON file")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=MIX_RATIO, help=f"replay records per SCOUT record (default 0.2; {MIX_RATIO})")
    amount.add_argument("--replay-fraction", type=MIX_REPLAY_FRACTION,
                        help=f"share of replay records in the mix ({MIX_REPLAY_FRACTION})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scout-image-prefix", default="", help="joined before SCOUT image paths")
    p.add_argument("--replay-image-prefix", default="", help="joined before replay image paths")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("validate", help="check LLaVA JSON; exits 1 if any record is bad")
    p.add_argument("files", nargs="+")
    p.add_argument("--image-folder", help="check that each image exists and opens")
    p.add_argument("--max-report", type=REPORT, default=200, help=f"bad records printed per file ({REPORT})")

    p = sub.add_parser("stats", help="counts per task, kind, difficulty, split; steps and boxes")
    p.add_argument("files", nargs="+")

    p = sub.add_parser("preview", help="draw a record's boxes and steps onto its image")
    p.add_argument("file")
    p.add_argument("--image-folder", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, default=0)
    which.add_argument("--id")
    p.add_argument("--out", required=True,
                   help=f"image to write; its suffix names the format ({', '.join(IMAGE_FORMATS)})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser, modules


# the converters' annotation files (their folders are checked as folders)
INPUT_FILE_FLAGS = ("instances", "refs", "regions", "objects", "image_data", "split_file")


def _generate(args: argparse.Namespace, module: Any) -> int:
    name = SOURCE_COMMANDS[args.command][0]
    images = getattr(args, "images", None)
    if images and not os.path.isdir(images):
        raise CliError(f"--images {images}: no such folder")
    for flag in INPUT_FILE_FLAGS:  # before the output folder is made: a refused input leaves nothing behind
        given = getattr(args, flag, None) or []
        for path in given if isinstance(given, list) else [given]:
            check_input(path, what=f"--{flag.replace('_', '-')}")
    if hasattr(module, "check_args"):
        module.check_args(args)
    settings = {k: v for k, v in vars(args).items() if k not in RUN_ONLY_FLAGS}
    with output_lock(args.out, "--out"):
        fresh = not os.path.exists(args.out)
        done = prepare_out_dir(args.out, args.resume, settings)
        args.skip_ids = done
        folder = module.image_folder(args) if hasattr(module, "image_folder") else getattr(args, "images", None)
        total = module.estimate_total(args) if hasattr(module, "estimate_total") else None
        info = {"seed": args.seed, "command": " ".join([PROG, *sys.argv[1:]]) if sys.argv else PROG}
        try:
            summary = write_dataset(
                module.iter_samples(args),
                args.out,
                source=name,
                image_folder=folder,
                frame=args.frame,
                shard_size=args.shard_size,
                done_ids=done,
                total=total,
                check_images=not args.no_check_images,
                info=info,
                progress=False if args.quiet else None,
            )
        except (CliError, DataError, OutputError, ValueError, OSError):
            if fresh and set(os.listdir(args.out)) <= {RUN_FILE}:  # refused before a record: leave nothing
                shutil.rmtree(args.out, ignore_errors=True)
            raise
    print(format_summary(summary))
    return 0


def _mix(args: argparse.Namespace) -> int:
    from scout_data.mix import mix_records

    out = os.path.abspath(args.out)
    with output_lock(out, "--out"):
        check_output(out, [*args.scout, args.replay], args.overwrite)
        scout = [r for f in args.scout for r in load_conversations(f)]
        replay = load_conversations(args.replay, strict=False)  # replayed as LLaVA reads it
        ratio = args.ratio if args.ratio is not None or args.replay_fraction is not None else 0.2
        mixed = mix_records(
            scout,
            replay,
            ratio=ratio,
            replay_fraction=args.replay_fraction,
            seed=args.seed,
            scout_image_prefix=args.scout_image_prefix,
            replay_image_prefix=args.replay_image_prefix,
        )
        atomic_write_text(out, dumps_records(mixed))
    n_g = sum(r.get("task") == "grounding" for r in mixed)
    print(f"mix: {len(mixed)} records ({n_g} grounding, {len(mixed) - n_g} understanding) -> {args.out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    bad_total = 0
    for path in args.files:
        n, bad = validate_file(path, args.image_folder)
        for b in bad[: args.max_report]:
            print(b)
        if len(bad) > args.max_report:
            print(f"{path}: ... {len(bad) - args.max_report} more problems")
        n_bad = len({b.index for b in bad})
        bad_total += n_bad
        print(f"{path}: {n} records, {n_bad} bad", file=sys.stderr)
    return 1 if bad_total else 0


def _stats(args: argparse.Namespace) -> int:
    from scout_data.stats import dataset_stats

    for path in args.files:
        print(json.dumps({"file": path, **dataset_stats(load_conversations(path))}, indent=2))
    return 0


def _preview(args: argparse.Namespace) -> int:
    from scout_data.images import ImageError, read_image
    from scout_data.preview import draw_record

    records = load_conversations(args.file)
    if args.id is not None:
        matches = [r for r in records if isinstance(r, dict) and str(r.get("id")) == args.id]
        if not matches:
            raise CliError(f"{args.file}: no record with id={args.id}")
        rec = matches[0]
    else:
        if not -len(records) <= args.index < len(records):
            raise CliError(f"{args.file}: --index {args.index} out of range ({len(records)} records)")
        rec = records[args.index]
    if not isinstance(rec, dict) or "image" not in rec or not rec.get("conversations"):
        raise CliError(
            f"{args.file}: record id={rec.get('id') if isinstance(rec, dict) else '?'} has no image"
        )
    path = os.path.join(args.image_folder, rec["image"])
    with output_lock(args.out, "--out"):
        check_output(args.out, [args.file, path], args.overwrite)
        fmt = image_format(args.out)
        try:
            image = read_image(path, f"image {path}", orient=False)  # as LLaVA's training reads it
        except ImageError as exc:
            raise CliError(f"{args.file} id={rec.get('id')}: {exc}") from None
        out = draw_record(rec, image)
        atomic_write(args.out, lambda tmp: out.save(tmp, format=fmt))
    print(f"preview of id={rec.get('id')} -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, modules = build_parser(argv)
        args = parser.parse_args(argv)
        if args.command in SOURCE_COMMANDS:
            return _generate(args, modules[args.command])
        return {"mix": _mix, "validate": _validate, "stats": _stats, "preview": _preview}[args.command](args)
    except (CliError, DataError, OutputError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (rerun with --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Merge a LoRA run of LLaVA's trainer into a plain LLaVA-1.5 checkpoint, with LLaVA's own loader.

    python -m playground.miniature.merge_lora --lora-dir LORA --base BASE --out MERGED

``llava.model.builder.load_pretrained_model(LORA, BASE, name)`` (``name`` holding 'llava' and 'lora') loads the
base, its ``non_lora_trainables.bin`` (the projector) and the adapter, and merges them. It always builds the
model in float16; the merged model is saved in float32, as the other demo checkpoints.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from llava.model.builder import load_pretrained_model

MODEL_NAME = "llava-v1.5-demo-lora"


def merge_lora(lora_dir: str | Path, base: str | Path, out: str | Path) -> Path:
    """Write the merged model and the base's tokenizer to ``out`` (replaced as a whole when done)."""
    tokenizer, model, _, _ = load_pretrained_model(str(lora_dir), str(base), MODEL_NAME, device="cpu")
    model = model.to(torch.float32)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m playground.miniature.merge_lora", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--lora-dir", required=True, help="output_dir of llava.train.train --lora_enable True")
    p.add_argument("--base", required=True, help="the LLaVA-1.5 checkpoint the LoRA run started from")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = merge_lora(args.lora_dir, args.base, args.out)
    print(f"merged {args.lora_dir} onto {args.base} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

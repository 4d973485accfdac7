"""Does a LLaVA model use the image? Its loss on training records with their own images against the same
records with the images shuffled among them (LLaVA's dataset and collator, ``--version v1``).

    python -m playground.miniature.image_reliance --model-path DIR --data train.json --image-folder DIR --out r.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch
from llava.model.builder import load_pretrained_model
from llava.train.train import DataCollatorForSupervisedDataset

from llava_twist.eval.answer_loss import llava_records
from scout_data.output import atomic_write_text


def image_reliance(model_path: str, data: str, image_folder: str, num: int = 64, seed: int = 0) -> dict[str, Any]:
    """Mean answer-token loss of ``num`` records of ``data`` with their own and with shuffled images."""
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, None, "llava-demo", device="cpu", device_map="cpu", torch_dtype=torch.float32)
    model = model.float().eval()
    dataset, picked = llava_records(data, image_folder, tokenizer, image_processor, num)
    if len(picked) < 2:
        raise ValueError(f"{data}: fewer than 2 records with an image")
    batch = DataCollatorForSupervisedDataset(tokenizer)([dataset[i] for i in picked])
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(picked), generator=generator)
    while bool((perm == torch.arange(len(picked))).any()):
        perm = torch.randperm(len(picked), generator=generator)
    with torch.no_grad():
        own = model(**batch).loss.item()
        shuffled = model(**{**batch, "images": batch["images"][perm]}).loss.item()
    return {"records": len(picked), "loss_own_images": own, "loss_shuffled_images": shuffled,
            "gap": shuffled - own}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m playground.miniature.image_reliance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--data", required=True, help="LLaVA conversation JSON")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result JSON")
    args = p.parse_args(argv)
    result = image_reliance(args.model_path, args.data, args.image_folder, args.num, args.seed)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

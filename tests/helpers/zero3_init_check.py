"""Run under `deepspeed --num_gpus 2` (CPU, gloo): build TWIST from a LLaVA checkpoint inside
`zero.Init` and check, on every rank, that parameters are partitioned and each grounding expert,
gathered, equals its frozen expert; then end as training does. Writes one JSON line per
rank to --out."""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from llava_twist.model.builder import gathered, load_twist_model, own_params, twist_config_for
from llava_twist.train.distributed import exit_distributed

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--experts", default="mlp,layer")
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()


def check(expert: str) -> dict[str, bool]:
    model = load_twist_model(args.model, twist_config_for(args.model, twist_expert=expert, twist_layers="all"))
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    equal = True
    for layer in model.get_model().twin_decoder_layers():
        for frozen, copy in layer.grounding_modules():
            src, dst = own_params(frozen), dict(copy.named_parameters())
            with gathered(list(src.values()) + list(dst.values()), modifier_rank=None):
                equal &= all(torch.equal(src[n].data, dst[n].data) and dst[n].numel() > 0 for n in dst)
    return {"partitioned": partitioned, "copies_equal": bool(equal)}


deepspeed.init_distributed(dist_backend="gloo")
ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained build under zero.Init
rank = int(os.environ.get("RANK", 0))
results = {expert: check(expert) for expert in args.experts.split(",")}
with open(f"{args.out}.{rank}", "w") as f:
    json.dump({"rank": rank, **results}, f)
exit_distributed()

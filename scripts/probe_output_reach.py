"""How likely can a LLaVA-1.5 checkpoint's frozen output layer make each word? The ceiling TWIST's layer twins face.

A Llama's last hidden state passes RMSNorm, which fixes its length (sqrt(hidden) times the norm's weights), and then
``lm_head``, so each token's probability has a ceiling set by those two frozen weights alone: the best over every
direction the hidden state can take. Rows that training only ever pushed down (words the base never wrote) lie
close to the others and their ceiling is low; twin layers cannot pass it, a grounding copy of the output layer
(``--twist_head True``) can. This prints the ceilings of the words a dataset's answers use, lowest first:

    python scripts/probe_output_reach.py playground/models/tiny-llava-v1.5 --data DIR/train.json
    python scripts/probe_output_reach.py MODEL --words Step Answer the
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_twist.train.records import load_records  # noqa: E402

NORM, HEAD = "model.norm.weight", "lm_head.weight"


def read_tensors(model_path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``names`` from a checkpoint folder's safetensors or ``.bin`` files (sharded or not)."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({weight_map[n] for n in names if n in weight_map})
            break
    else:
        files = [f.name for f in sorted(model_path.glob("*.safetensors")) or sorted(model_path.glob("*.bin"))]
    for name in files:
        path = model_path / name
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                found.update({n: f.get_tensor(n) for n in names if n in f.keys()})
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            found.update({n: state[n] for n in names if n in state})
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{model_path}: no {', '.join(missing)} in {', '.join(files) or 'any weights file'}")
    return found


def ceilings(head: torch.Tensor, norm: torch.Tensor, token_ids: Sequence[int], steps: int = 400,
             restarts: int = 4, seed: int = 0) -> torch.Tensor:
    """The highest log-probability each token can get from ``lm_head(RMSNorm(h))`` over every hidden state ``h``
    (gradient ascent on the direction of ``h``, best of ``restarts`` starts)."""
    head, norm = head.float(), norm.float()
    d = head.shape[1]
    targets = torch.tensor(list(token_ids)).repeat_interleave(restarts)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(len(targets), d, generator=gen).requires_grad_(True)
    optim = torch.optim.Adam([direction], lr=0.05)
    for _ in range(steps):
        normed = direction / direction.norm(dim=1, keepdim=True) * math.sqrt(d)
        logp = torch.log_softmax((normed * norm) @ head.T, dim=1).gather(1, targets[:, None]).squeeze(1)
        optim.zero_grad()
        (-logp.sum()).backward()
        optim.step()
    return logp.detach().view(len(token_ids), restarts).max(dim=1).values


def answer_token_counts(data: Path, tokenizer) -> Counter:
    """How often each token occurs in the answers (``gpt`` turns) of a LLaVA conversation JSON."""
    counts: Counter = Counter()
    for record in load_records(data):
        for turn in record.get("conversations", []) if isinstance(record, dict) else []:
            if turn.get("from") == "gpt":
                counts.update(tokenizer(turn["value"], add_special_tokens=False).input_ids)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_path", type=Path, help="a LLaVA-1.5 checkpoint folder")
    parser.add_argument("--data", type=Path, help="a LLaVA conversation JSON: probe the tokens of its answers")
    parser.add_argument("--words", nargs="*", default=[], help="tokens to probe (as the tokenizer spells them)")
    parser.add_argument("--show", type=int, default=15, help="rows to print, lowest ceiling first")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    try:
        tensors = read_tensors(args.model_path, (NORM, HEAD))
        tokenizer = AutoTokenizer.from_pretrained(str(args.model_path), use_fast=False)
        counts = answer_token_counts(args.data, tokenizer) if args.data else Counter()
    except (OSError, ValueError, KeyError) as err:
        print(f"probe_output_reach: {err}", file=sys.stderr)
        return 2
    for word in args.words:
        counts[tokenizer.convert_tokens_to_ids(word)] += 0
    if not counts:
        print("probe_output_reach: give --data or --words", file=sys.stderr)
        return 2
    ids = sorted(counts)
    best = dict(zip(ids, ceilings(tensors[HEAD], tensors[NORM], ids).tolist(), strict=True))
    total = sum(counts.values())
    capped = [t for t in ids if best[t] < math.log(0.5)]
    print(f"{args.model_path}: {len(ids)} tokens probed; {len(capped)} cannot pass probability 0.5"
          + (f" ({sum(counts[t] for t in capped) / total:.1%} of the answers' tokens)" if total else ""))
    print(f"{'token':>12} {'in answers':>10} {'ceiling':>8} {'max p':>7}")
    for t in sorted(ids, key=lambda t: best[t])[: args.show]:
        print(f"{tokenizer.convert_ids_to_tokens(t)!r:>12} {counts[t]:>10} {best[t]:>8.2f} {math.exp(best[t]):>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

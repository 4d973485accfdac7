"""LLaVA-1.5's own trainer, ``llava.train.train``, with the process seeded from ``--seed`` before the model is built.

LLaVA seeds only when its ``Trainer`` starts, after ``--lora_enable`` has drawn the LoRA adapters' first weights
from torch's generator, which a fresh process seeds at random: two LoRA runs of the same settings then differ
(the demo measured 0.0% and 9.4% Acc@0.5). Arguments are LLaVA's, unchanged:

    python -m llava_twist.train.train_llava --model_name_or_path ./checkpoints/llava-v1.5-7b --lora_enable True \\
        --seed 0 ...   # then every flag of LLaVA's finetune_lora.sh
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import transformers

DEFAULT_SEED = transformers.TrainingArguments.seed  # what LLaVA's Trainer seeds with when --seed is not given


def seed_of(argv: Sequence[str]) -> int:
    """The value of ``--seed`` in LLaVA's arguments (``--seed 3`` or ``--seed=3``), else the Trainer's default."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    return parser.parse_known_args(list(argv))[0].seed


def main() -> None:
    from llava.train.train import train

    transformers.set_seed(seed_of(sys.argv[1:]))
    train()


if __name__ == "__main__":
    main()

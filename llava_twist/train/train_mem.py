"""`train_twist` with FlashAttention-2 (as LLaVA's ``train_mem.py``); needs the ``flash-attn`` package and a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_twist.train.train_twist import main  # noqa: E402

if __name__ == "__main__":
    main(attn_implementation="flash_attention_2")

"""``python -m llava_twist.lmms``: whether lmms-eval is installed (exit 2 naming the install when not), and how to run
``--model llava_twist``."""

from __future__ import annotations

import sys
from importlib.metadata import version

from llava_twist.lmms import LMMS_EVAL, require_lmms_eval


def main(argv: list[str] | None = None) -> int:
    try:
        require_lmms_eval()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    found = version("lmms-eval")
    pinned = LMMS_EVAL.split("==", 1)[1]
    note = "" if found == pinned else f" (this project pins {pinned}: other versions are untested)"
    print(f"lmms-eval {found}{note}: python -m lmms_eval --model llava_twist --model_args pretrained=CKPT,"
          "twist_route=auto --tasks ...")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

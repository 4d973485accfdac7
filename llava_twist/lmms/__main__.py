"""``python -m llava_twist.lmms``: whether lmms-eval is installed (exit 2 naming the install when not), and how to run
``--model llava_twist``."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from llava_twist.lmms import INSTALL_HINT, LMMS_EVAL


def main(argv: list[str] | None = None) -> int:
    try:
        found = version("lmms-eval")
    except PackageNotFoundError:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    pinned = LMMS_EVAL.split("==", 1)[1]
    note = "" if found == pinned else f" (this project pins {pinned}: other versions are untested)"
    print(f"lmms-eval {found}{note}: python -m lmms_eval --model llava_twist --model_args pretrained=CKPT,"
          "twist_route=auto --tasks ...")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

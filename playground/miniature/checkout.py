"""Where the miniature finds the repository it runs from: it is run from a source checkout (``make demo``,
``make base``), never installed, and this is the one place that computes the checkout's root."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
TWIST_LAUNCHER = SCRIPTS / "finetune_twist_cpu.sh"
TWIST_GPU_LAUNCHER = SCRIPTS / "finetune_twist.sh"
LLAVA_DS_CONFIG = SCRIPTS / "zero2.json"
TWIST_ENTRY = "llava_twist/train/train_twist.py"  # what DeepSpeed's launcher runs for TWIST on CUDA, from REPO
TRAIN_LLAVA = Path(find_spec("llava_twist.train.train_llava").origin)  # what it runs for LLaVA's trainer on CUDA
DEMO_OUT = REPO / "playground" / "data" / "demo"  # what `make playground` opens
BASE_BUILD = REPO / "playground" / "data" / "base-build"  # `make base`'s stages
RELEASE_DIR = "playground/models/tiny-llava-v1.5"  # the released base, relative to REPO

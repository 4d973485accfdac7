"""llava-twist: visual grounding for LLaVA-1.5 without forgetting (TWIST & SCOUT, arXiv 2410.10491).

`llava` itself is deliberately not an install requirement: its wheel (`llava-torch`) pins torch 2.0.1,
transformers 4.36.2, gradio 4.16 and more, which would break this stack. Install it with
`pip install --no-deps llava-torch==1.2.2.post1` (`make install` does).
"""

from setuptools import find_packages, setup

LLAVA_STACK = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers==4.37.2",
    "tokenizers>=0.15,<0.16",
    "huggingface-hub<1.0",
    "accelerate==0.30.1",
    "safetensors>=0.4",
    "sentencepiece>=0.1.99",
    "protobuf>=3.20",
    "einops>=0.6",
    "shortuuid>=1.0",
]
DATA = ["numpy>=1.24", "pillow>=10", "pycocotools>=2.0.7", "tqdm>=4.66", "matplotlib>=3.7"]
EVAL = ["scipy>=1.11"]  # exact McNemar and bootstrap intervals of paired comparisons (llava_twist.eval.paired)
# lmms-eval's runtime needs (llava_twist.lmms), each version the one tested: its own release is installed with
# --no-deps (its metadata asks for transformers>=4.39, which LLaVA-1.5 cannot run on, and for ~50 packages a LLaVA run
# never imports), so these are what `python -m lmms_eval` imports with a LLaVA model and generate_until tasks.
# datasets 2.21: newer ones need huggingface-hub>=1 (transformers 4.37.2: <1); it holds fsspec at <=2024.6.1.
# filelock<4: lmms-eval 0.7 reaches into filelock._api, which 4.x removed.
LMMS = [
    "datasets==2.21.0", "pyarrow==26.0.1", "dill==0.3.8", "multiprocess==0.70.16", "xxhash==4.1.0",
    "aiohttp==3.14.5", "aiohappyeyeballs==2.7.1", "aiosignal==1.4.0", "attrs==26.1.0", "frozenlist==1.8.0",
    "multidict==7.2.1", "propcache==0.5.4", "yarl==1.25.1", "loguru==0.8.0", "tenacity==9.2.1", "evaluate==0.4.6",
    "sacrebleu==2.6.0", "portalocker==4.4.2", "tabulate==0.10.0", "colorama==0.4.6", "lxml==6.2.1",
    "pytablewriter==1.2.1", "DataProperty==1.1.1", "mbstrdecoder==1.1.5", "pathvalidate==3.3.1",
    "tabledata==1.3.5", "tcolorpy==0.1.7", "typepy==1.3.5", "chardet==5.2.0", "filelock>=3.20,<4",
]

setup(
    name="llava-twist",
    version="0.1.0",
    description="TWIST & SCOUT for LLaVA-1.5: grounding experts that add visual grounding without forgetting",
    long_description=__doc__,
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["llava_twist", "llava_twist.*", "scout_data", "scout_data.*", "playground"]),
    install_requires=LLAVA_STACK + DATA + EVAL,
    extras_require={
        "train": ["deepspeed==0.19.8", "peft==0.10.0"],
        "demo": ["gradio==6.17.3"],
        # the model worker in LLaVA's serving stack (llava_twist.serve.model_worker) and LLaVA's controller
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "requests>=2.31"],
        # lmms-eval's runtime; lmms-eval itself: pip install --no-deps lmms-eval==0.7.3 (make install does both)
        "lmms": LMMS,
        # make test runs the suite on 2 workers, a file's tests on one (--dist loadgroup); pytest 9.2 drops the
        # groups silently (pytest-xdist issue 1386), so the pin stays below it until xdist follows
        "dev": ["pytest>=8,<9.2", "pytest-xdist>=3.6", "hypothesis>=6.100", "ruff>=0.6", "playwright>=1.50"],
    },
    package_data={"llava_twist.lmms.tasks": ["*.yaml"]},
    entry_points={
        # `python -m lmms_eval --model llava_twist` (lmms-eval >= 0.6 reads this group)
        "lmms_eval.models": ["llava_twist = llava_twist.lmms:manifests"],
        "console_scripts": [
            "scout-data=scout_data.cli:main",
            "llava-twist-tiny=llava_twist.tiny:main",
            "llava-twist-cli=llava_twist.serve.cli:main",
            "llava-twist-eval=llava_twist.eval.model_grounding:main",
            "llava-twist-eval-summary=llava_twist.eval.summary:main",
            "llava-twist-train=llava_twist.train.train_twist:main",
        ]
    },
)

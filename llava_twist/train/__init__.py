"""TWIST training: LLaVA's trainer, data and command line, fine-tuning only the grounding experts.

Entry points: ``python -m llava_twist.train.train_twist`` (or ``deepspeed llava_twist/train/train_twist.py``)
and ``llava_twist.train.train_mem`` (FlashAttention-2); ``llava_twist.train.train_llava`` is LLaVA's own trainer
seeded before the model is built (the demo's full fine-tuning and LoRA baselines).
"""

"""TWIST training: LLaVA's trainer, data and command line, fine-tuning only the grounding experts.

Entry points: ``python -m llava_twist.train.train_twist`` (or ``deepspeed llava_twist/train/train_twist.py``)
and ``llava_twist.train.train_mem`` (FlashAttention-2).
"""

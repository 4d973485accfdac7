"""``make demo``: the paper's claim in miniature, on CPU (or, where CUDA is present, one GPU).

    python -m llava_twist.demo [--profile full|gpu|ci] [--out playground/data/demo] [--force STAGE]

Stages, each cached under ``--out``: ``model`` (tiny LLaVA-1.5), ``data`` (SCOUT base data, grounding chains,
replay mix), ``warmup-<lesson>`` and ``base`` (LLaVA's trainer), ``twist-<variant>``
(``scripts/finetune_twist_cpu.sh``; on CUDA ``scripts/finetune_twist.sh``), ``full-ft`` and ``lora`` (LLaVA's
trainer), ``eval`` (the project's eval scripts), ``report``.
"""

"""``make demo``: the paper's claim in miniature on CPU (issue 7).

    python -m llava_twist.demo [--profile full|full-boxes|ci] [--out playground/data/demo] [--force STAGE]

Stages, each cached under ``--out``: ``model`` (tiny LLaVA-1.5), ``data`` (SCOUT base data, grounding chains,
replay mix), ``warmup-<lesson>`` and ``base`` (LLaVA's trainer), ``twist-<variant>``
(``scripts/finetune_twist_cpu.sh``), ``full-ft`` and ``lora`` (LLaVA's trainer), ``eval`` (the project's eval
scripts), ``report``.
"""

"""``make demo``: the paper's claim in miniature, on CPU (or, where CUDA is present, one GPU).

    python -m playground.miniature [--profile full|gpu|ci] [--seed N] [--variant rec] [--out DIR] [--force STAGE]

Stages, each cached under ``--out``: ``model`` (tiny LLaVA-1.5), ``data`` (base data, the grounding records:
one-shot referring expressions, SCOUT chains and find-all, the replay mix, and fresh held-out dev, test and
understanding sets), ``warmup-<lesson>`` and ``base`` (LLaVA's trainer), ``twist-<variant>``
(``scripts/finetune_twist_cpu.sh``; on CUDA ``scripts/finetune_twist.sh``), ``full-ft`` and ``lora`` (LLaVA's
trainer), ``eval`` (every model under both prompts, paired statistics; ``playground.miniature.evaluation``), ``report``.
"""

"""Offline lmms-eval tasks (``twist_rec``, ``twist_understanding``): YAMLs here, functions in :mod:`.utils`."""

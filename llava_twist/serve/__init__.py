"""Inference: loading (``loading``), prompting (``prompting``), generation (``generation``), batching concurrent
requests (``batching``), all in one import as ``llava_twist.serve.inference``; the CLI (``python -m
llava_twist.serve.cli``) and the model worker for LLaVA's serving stack (``model_worker``)."""

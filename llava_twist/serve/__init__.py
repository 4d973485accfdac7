"""Inference: shared helpers (``llava_twist.serve.inference``) and the CLI (``python -m llava_twist.serve.cli``)."""

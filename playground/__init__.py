"""The Gradio playground of llava-twist (``python -m playground``); ``playground/data/`` is its runtime data."""

"""The inference library in one import, as users know it (``from llava_twist.serve.inference import generate,
load_model``). Each concern has its own module: loading (:mod:`llava_twist.serve.loading`), prompting
(:mod:`llava_twist.serve.prompting`), generation (:mod:`llava_twist.serve.generation`), and batching concurrent
requests (:mod:`llava_twist.serve.batching`)."""

from llava_twist.serve.generation import (
    MAX_NEW_TOKENS,
    NUM_BEAMS,
    TEMPERATURE,
    TOP_P,
    GenerationSettings,
    TokenLogprobRecorder,
    add_generation_arguments,
    generate,
    span_scores,
    stream_generate,
    stream_prompt,
)
from llava_twist.serve.loading import MODEL_CLASSES, LoadedModel, load_model, resolve_device
from llava_twist.serve.prompting import (
    DEFAULT_CONV_MODE,
    build_prompt,
    check_prompt_length,
    context_limit,
    load_image,
    prepare_inputs,
    prepare_prompts,
)

__all__ = [
    "DEFAULT_CONV_MODE", "MAX_NEW_TOKENS", "MODEL_CLASSES", "NUM_BEAMS", "TEMPERATURE", "TOP_P", "GenerationSettings",
    "LoadedModel", "TokenLogprobRecorder", "add_generation_arguments", "build_prompt", "check_prompt_length",
    "context_limit", "generate", "load_image", "load_model", "prepare_inputs", "prepare_prompts", "resolve_device",
    "span_scores", "stream_generate", "stream_prompt",
]

"""The prompts a referring-expression question can be asked with (``model_grounding --prompt``).

- ``scout`` (default): the question's own ``text``, SCOUT's step-by-step prompt for SCOUT question files.
- ``llava``: LLaVA-1.5's REC prompt, the one its instruction mix trains on for RefCOCO/VG
  ("Please provide the bounding box coordinate of the region this sentence describes: ...").
- ``lmms-eval``: lmms-eval's RefCOCO prompt (:data:`llava_twist.eval.protocols.LMMS_EVAL_REC_PROMPT`).

The last two ask for the question's ``expression`` (written by ``scout_questions`` for refexp records).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

from llava_twist.eval.common import EvalError
from llava_twist.eval.protocols import LMMS_EVAL_REC_PROMPT
from llava_twist.serve.prompting import build_prompt
from scout_data.writer import render_prompt

PROMPT_STYLES = ("scout", "llava", "lmms-eval")


def question_prompt(question: dict[str, Any], style: str = "scout") -> str:
    """The text ``question`` is asked with under ``style`` (the conversation template is added later)."""
    if style == "scout":
        return question["text"]
    if style not in PROMPT_STYLES:
        raise EvalError(f"--prompt {style!r}: expected one of {PROMPT_STYLES}")
    expression = question.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise EvalError(
            f"question {question.get('question_id')}: --prompt {style} needs its 'expression' (question files made "
            "by llava_twist.eval.scout_questions from refexp records carry it)"
        )
    if style == "llava":
        return render_prompt(expression, "region")
    return LMMS_EVAL_REC_PROMPT.format(expression=" ".join(expression.split()))


def prompt_code_version() -> str:
    """A hash of the code that turns a question into the model's input: answers made by other code are stale."""
    source = inspect.getsource(question_prompt) + inspect.getsource(build_prompt) + inspect.getsource(render_prompt)
    return hashlib.sha1(source.encode()).hexdigest()[:12]

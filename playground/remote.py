"""The playground as a client of LLaVA's serving stack (``python -m playground --controller-url URL``): the models
a LLaVA controller lists, each answer streamed from the worker that serves it (a TWIST worker,
``python -m llava_twist.serve.model_worker``, or LLaVA's own), so the UI runs on one machine and the models on
others."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

from PIL import Image

from llava_twist.serve.inference import DEFAULT_CONV_MODE, GenerationSettings
from llava_twist.serve.result import InferenceResult, result_from_text
from llava_twist.serve.worker_protocol import ServingError, list_models, stream_chunks, worker_address
from playground.models import PlaygroundError
from scout_data.boxes import DEFAULT_FRAME


def image_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class RemoteModels:
    """The models of one controller, asked for afresh on each request (workers come and go)."""

    def __init__(self, controller_url: str) -> None:
        self.controller_url = controller_url.rstrip("/")

    def names(self) -> list[str]:
        try:
            return list_models(self.controller_url)
        except ServingError as exc:
            raise PlaygroundError(f"the controller at {self.controller_url} cannot be reached: {exc}") from exc

    def stream(self, model: str, query: str, image: Image.Image,
               settings: GenerationSettings) -> Iterator[str | InferenceResult]:
        """Text pieces as ``model``'s worker streams them, then the parsed :class:`InferenceResult` with the route
        the worker reports (none from LLaVA's own worker). A worker that fails or goes away raises a
        :class:`PlaygroundError` naming the model."""
        from llava.conversation import conv_templates

        from llava_twist.serve.inference import build_prompt

        try:
            address = worker_address(self.controller_url, model)
        except ServingError as exc:
            raise PlaygroundError(f"model {model} is no longer served: {exc}") from exc
        prompt = build_prompt(query, settings.conv_mode or DEFAULT_CONV_MODE)
        payload = {
            "model": model, "prompt": prompt, "images": [image_base64(image)],
            "temperature": settings.temperature, "top_p": settings.top_p or 1.0,
            "max_new_tokens": settings.max_new_tokens, "stop": conv_templates[settings.conv_mode].sep2,
            "twist_route": settings.route,
        }
        answer, last = "", {}
        for chunk in stream_chunks(address, payload):
            if chunk.get("error_code", 1) != 0:
                raise PlaygroundError(f"model {model}: {chunk.get('text', 'the worker sent an error')}")
            text = chunk["text"][len(prompt):]  # as LLaVA's web UI reads it: the prompt, then the answer
            if text.startswith(answer) and len(text) > len(answer):
                yield text[len(answer):]
            answer, last = text, chunk
        frame = last.get("box_frame") or settings.box_frame or DEFAULT_FRAME  # the frame the worker's model answers in
        yield result_from_text(answer.strip(), image.size, frame,
                               last.get("twist_route"), last.get("router_prob"), bool(last.get("route_forced")),
                               None, query)

"""The TWIST & SCOUT playground: ask a question about an image, watch the answer stream step by step and
each step's boxes appear on the image.

    python -m playground                                  # the demo model (or a tiny random one)
    python -m playground --model-path ./checkpoints/llava-v1.5-7b-twist
    python -m playground --model-path ./checkpoints/twist-delta --model-base liuhaotian/llava-v1.5-7b

The model writes boxes as normalised ``[x1, y1, x2, y2]`` in the padded square it sees
(``image_aspect_ratio=pad``); every box is drawn and listed in pixels of the original image
(``llava_twist.serve.result.result_from_text``, the one frame module ``scout_data.boxes``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from llava_twist.model.routes import AUTO, FROZEN, GROUNDING, Route  # noqa: E402
from llava_twist.serve.batching import Batcher  # noqa: E402
from llava_twist.serve.drawing import draw_boxes  # noqa: E402
from llava_twist.serve.generation import GenerationSettings  # noqa: E402
from llava_twist.serve.loading import LoadedModel, load_model  # noqa: E402
from llava_twist.serve.prompting import build_prompt  # noqa: E402
from llava_twist.serve.result import InferenceError, InferenceResult, result_from_text  # noqa: E402
from playground.make_examples import EXAMPLES_DIR, EXAMPLES_FILE  # noqa: E402
from playground.models import (  # noqa: E402
    DATA_DIR,
    PlaygroundError,
    describe_model,
    resolve_model_source,
)
from playground.panels import PanelUpdate  # noqa: E402
from playground.remote import RemoteModels  # noqa: E402
from playground.worker import GenerationJob  # noqa: E402
from scout_data.boxes import DEFAULT_FRAME  # noqa: E402
from scout_data.images import ImageError, image_size_problem, read_image, to_rgb  # noqa: E402

MAX_FILE_SIZE = "10mb"
MAX_QUERY_CHARS = 2000
MAX_BATCH = 5  # users whose answers are generated together (LLaVA's --limit-model-concurrency default)
MAX_QUEUE = 32  # users waiting beyond those (Gradio's queue)
UPDATE_EVERY_S = 0.25
MIN_DRAWN_WIDTH = 320  # a smaller image is drawn on an enlarged copy: its boxes' labels would cover its objects
SERVED_ID = "llava-twist-output"  # PNG text key of each output image (see served_image)
ROUTE_CHOICES: dict[str, str] = {
    "Auto (router decides)": AUTO,
    "Original LLaVA (frozen)": FROZEN,
    "Grounding": GROUNDING,
}
ROUTE_LABELS = {v: k for k, v in ROUTE_CHOICES.items()}

TextGenerator = Callable[[str, Image.Image, GenerationSettings], Iterable[str | InferenceResult]]


def check_image(image: Image.Image | None) -> Image.Image:
    """An RGB copy of a usable image, or a :class:`PlaygroundError` saying what is wrong with it."""
    if image is None:
        raise PlaygroundError("No image: upload one or pick an example below.")
    problem = image_size_problem(*image.size)
    if problem:
        raise PlaygroundError(f"The image cannot be used: {problem}.")
    return to_rgb(image)


def check_query(query: str | None) -> str:
    query = (query or "").strip()
    if not query:
        raise PlaygroundError("Type a question about the image.")
    if len(query) > MAX_QUERY_CHARS:
        raise PlaygroundError(f"The question has {len(query)} characters; the limit is {MAX_QUERY_CHARS}.")
    return query


class Backend:
    """The model behind the UI: loaded here, whose concurrent users' answers are generated together (a
    :class:`Batcher`, as the model worker's), or the models of a LLaVA controller (``remote``) or a test's
    ``generate_fn``, one generation at a time (a lock, besides Gradio's queue)."""

    def __init__(
        self,
        loaded: LoadedModel | None,
        description: str = "",
        generate_fn: TextGenerator | None = None,
        box_frame: str | None = None,
        examples_dir: str | Path | None = None,
        remote: RemoteModels | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if loaded is None and generate_fn is None and remote is None:
            raise ValueError("Backend needs a loaded model, a generate_fn or a controller's models")
        self.loaded = loaded
        self.remote = remote
        self.description = description
        self.examples_dir = Path(examples_dir) if examples_dir else EXAMPLES_DIR  # the model's world, else bundled
        self.generate_fn = generate_fn
        self.box_frame = box_frame or (loaded.default_box_frame() if loaded is not None else DEFAULT_FRAME)
        self.lock = threading.Lock()
        self.batcher = None
        if loaded is not None and generate_fn is None:
            self.batcher = Batcher(loaded, max_batch=max_batch, max_waiting=MAX_QUEUE)

    @property
    def concurrency(self) -> int:
        """How many requests the UI runs at once: the batch's size when generations are shared, else 1."""
        return self.batcher.max_batch if self.batcher is not None else 1

    def _job_lock(self) -> threading.Lock:
        """What a request's generations hold: a lock of its own when they go through the batcher, else the one."""
        return threading.Lock() if self.batcher is not None and self.generate_fn is None else self.lock

    def _generator(self) -> TextGenerator:
        if self.generate_fn is not None:
            return self.generate_fn
        loaded, batcher = self.loaded, self.batcher
        mm_start_end = bool(getattr(loaded.model.config, "mm_use_im_start_end", False))

        def real(query: str, image: Image.Image, settings: GenerationSettings) -> Iterator[str | InferenceResult]:
            prompt = build_prompt(query, settings.conv_mode, mm_start_end)
            for item in batcher.stream(prompt, image, settings, label=query):
                yield item if isinstance(item, InferenceResult) else item[0]

        return real

    def start(self, query: str, image: Image.Image, settings: GenerationSettings,
              model: str | None = None) -> Iterator[str | InferenceResult]:
        """Start generating: text pieces, then (from a real model) the :class:`InferenceResult`; ``model`` names
        the controller's model in remote mode."""
        settings.box_frame = settings.box_frame or self.box_frame
        if self.remote is not None and self.generate_fn is None:
            if not model:
                raise PlaygroundError("Pick a model: the controller's models are listed above.")
            return iter(self.remote.stream(model, query, image, settings))
        return iter(self._generator()(query, image, settings))

    def stream(self, query: str, image: Image.Image, settings: GenerationSettings) -> Iterator[PanelUpdate]:
        """Updates for one answer (see :meth:`updates`)."""
        items = self.start(query, image, settings)
        return self.updates(items, query, image, settings)

    def updates(
        self, items: Iterator[str | InferenceResult], query: str, image: Image.Image, settings: GenerationSettings
    ) -> Iterator[PanelUpdate]:
        """One update whenever a step or a box completes (else at most every ``UPDATE_EVERY_S`` seconds), then
        the final one (``done``). Closing this generator leaves ``items`` running (see :class:`GenerationJob`)."""
        label = ROUTE_LABELS.get(settings.route, settings.route)
        frame = settings.box_frame or self.box_frame
        text, final, drawn_boxes, drawn = "", None, -1, image
        last_key, last_time = None, 0.0
        for item in items:  # read to the end: a job's next generation follows in the same stream
            if isinstance(item, InferenceResult):
                final = item
            if final is not None:
                continue
            text += item
            partial = result_from_text(text, image.size, frame, prompt=query)
            if len(partial.boxes) != drawn_boxes:
                drawn, drawn_boxes = draw_boxes(image, partial, min_width=MIN_DRAWN_WIDTH), len(partial.boxes)
            key = (len(partial.chain.steps), len(partial.boxes), partial.chain.has_answer_line)
            now = time.monotonic()
            if key != last_key or now - last_time >= UPDATE_EVERY_S:
                last_key, last_time = key, now
                yield PanelUpdate(partial, served_image(drawn), False, label)
        if final is None:
            final = result_from_text(text.strip(), image.size, frame, prompt=query)
        yield PanelUpdate(final, served_image(draw_boxes(image, final, min_width=MIN_DRAWN_WIDTH)), True, label)

    def run(
        self,
        image: Image.Image | None,
        query: str | None,
        route_label: str,
        compare: bool,
        temperature: float,
        max_new_tokens: float,
        model: str | None = None,
        other: str | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """The Gradio handler: yields (image, steps, info, data) for TWIST, then the same for original LLaVA (in
        remote mode: for ``model``, then ``other`` on the frozen route, e.g. a plain LLaVA worker of the same base).

        The generations run on a :class:`GenerationJob`, which holds the lock until they end: a request closed
        early (cancelled, disconnected) frees the model when its generation ends, however late Python finalises
        this generator, and the next request never shares the model mid-generate."""
        try:
            image = check_image(image)
            query = check_query(query)
            try:
                route = Route.parse(ROUTE_CHOICES.get(route_label, route_label))
            except ValueError:
                raise PlaygroundError(f"Unknown route {route_label!r}; choose one of {list(ROUTE_CHOICES)}.") from None
            settings = dict(temperature=float(temperature), max_new_tokens=max(1, int(max_new_tokens)))
        except PlaygroundError as exc:
            raise gr.Error(str(exc)) from exc
        other = other or model
        second = compare and (route != FROZEN or other != model)
        runs = [GenerationSettings(route=route, **settings)] + (
            [GenerationSettings(route=FROZEN, **settings)] if second else [])
        models = [model, other][: len(runs)]
        job = GenerationJob(self._job_lock(), [functools.partial(self.start, query, image, s, m)
                                        for s, m in zip(runs, models, strict=True)])
        try:
            yield from self._panels(job, runs, query, image, compare)
        except (InferenceError, PlaygroundError) as exc:
            raise gr.Error(str(exc)) from exc
        except gr.Error:
            raise
        except Exception as exc:
            raise gr.Error(f"Generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            job.abandon()

    def _panels(
        self, job: GenerationJob, runs: list[GenerationSettings], query: str, image: Image.Image, compare: bool
    ) -> Iterator[tuple[Any, ...]]:
        empty = (None, "", "", None)
        twist = None
        for twist in self.updates(job.pieces(), query, image, runs[0]):
            yield (twist.image, twist.html(), twist.info(), twist.data(), *empty)
        if not compare:
            return
        if len(runs) == 1:
            note = twist.info() + "  \n(the selected route already is the original LLaVA computation)"
            yield (twist.image, twist.html(), twist.info(), twist.data(),
                   twist.image, twist.html(), note, twist.data())
            return
        for base in self.updates(job.pieces(), query, image, runs[1]):
            yield (twist.image, twist.html(), twist.info(), twist.data(),
                   base.image, base.html(), base.info(), base.data())


def served_image(image: Image.Image) -> Image.Image:
    """A copy of ``image`` with a fresh id in its PNG text. Gradio caches an output image under the hash of its PNG
    bytes, text included: without the id, two answers (or two updates of one) with the same picture share one file,
    which the later one rewrites while a browser is still reading it."""
    copy = image.copy()
    copy.info[SERVED_ID] = uuid.uuid4().hex
    return copy


# ---------------------------------------------------------------- UI


def check_upload(payload: Any) -> None:
    """Refuse an upload that is not a readable image or is too large, before Gradio decodes it."""
    path = getattr(payload, "path", None)
    if not path or str(getattr(payload, "url", "") or "").startswith("data:"):
        return
    name = getattr(payload, "orig_name", None) or Path(path).name
    try:
        read_image(path, name)
    except ImageError as exc:
        problem = str(exc).removeprefix(f"{name}: ")
        if problem.startswith("cannot be read as an image"):
            raise gr.Error(f"{name} is not an image this app can read (PNG, JPEG, WebP, GIF, BMP).") from None
        raise gr.Error(f"{name} cannot be used: {problem}.") from None


def checked_image(**kwargs: Any) -> gr.Image:
    """``gr.Image`` whose uploads pass :func:`check_upload` (a clear message instead of a decoder traceback).

    The check wraps the instance's ``preprocess``: a ``gr.Image`` subclass would make Gradio write a
    ``.pyi`` stub next to this file at import time."""
    component = gr.Image(**kwargs)
    decode = component.preprocess

    def preprocess(payload: Any) -> Any:
        check_upload(payload)
        try:
            return decode(payload)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise gr.Error(f"The uploaded image cannot be decoded ({type(exc).__name__}).") from exc

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def load_examples(examples_dir: str | Path = EXAMPLES_DIR) -> list[dict[str, Any]]:
    """Example scenes (``examples.json``, bundled or of the loaded model's world), with absolute image paths."""
    folder = Path(examples_dir).resolve()
    entries = json.loads((folder / EXAMPLES_FILE).read_text())
    for e in entries:
        e["path"] = str(folder / e["image"])
    return entries


CSS = """
.twist-chain { font-size: 15px; line-height: 1.5; }
.twist-pending { opacity: 0.6; }
.twist-box { font-size: 12px; }
"""


def servable_examples(folder: str | Path) -> Path:
    """``folder``, or a copy of it outside ``playground/data`` (which the server never serves) when it is inside."""
    folder = Path(folder).resolve()
    if not folder.is_relative_to(DATA_DIR.resolve()):
        return folder
    copy = Path(tempfile.mkdtemp(prefix="playground-examples-")) / folder.name
    shutil.copytree(folder, copy)
    return copy


def build_demo(backend: Backend, examples_dir: str | Path | None = None) -> gr.Blocks:
    """The playground's Blocks (not launched); examples from ``examples_dir``, else the backend's."""
    folder = Path(examples_dir or backend.examples_dir)
    examples = load_examples(folder)
    own_world = folder.resolve() != EXAMPLES_DIR.resolve()
    # every update is its own cached image (served_image): files older than an hour go, checked every 10 minutes
    with gr.Blocks(title="TWIST & SCOUT playground", delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "## TWIST & SCOUT playground\nAsk about an image; the answer streams step by step and each step's "
            "boxes appear on the image in its colour (the answer's in gold), in pixels of your image."
        )
        gr.Markdown(backend.description, elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1):
                image = checked_image(
                    type="pil", image_mode=None, format="png", label="Image", sources=["upload", "clipboard"],
                    elem_id="input-image", height=320,
                )
                query = gr.Textbox(label="Question", placeholder="Where is the red circle? Answer step by step.",
                                   lines=2, max_length=MAX_QUERY_CHARS, elem_id="query")
                models = remote_model_pickers(backend)
                route = gr.Radio(list(ROUTE_CHOICES), value=next(iter(ROUTE_CHOICES)), label="Route",
                                 elem_id="route")
                compare = gr.Checkbox(False, label=(
                    "Side by side: the model, and the other one on the frozen route" if backend.remote else
                    "Side by side: original LLaVA (frozen route) vs TWIST"), elem_id="compare")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0: greedy)")
                    max_new_tokens = gr.Slider(8, 1024, value=256, step=8, label="Max new tokens")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                gr.Examples(
                    examples=[[e["path"], e["query"]] for e in examples],
                    inputs=[image, query],
                    label=("Held-out scenes of the model's own world" if own_world
                           else "Example scenes (SCOUT synthetic)"),
                    elem_id="examples",
                )
            with gr.Column(scale=2):
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### Model" if backend.remote else "### TWIST")
                        out_image = gr.Image(type="pil", format="png", label="TWIST boxes", interactive=False,
                                             elem_id="twist-image")
                        out_info = gr.Markdown(elem_id="twist-info")
                        out_steps = gr.HTML(elem_id="twist-steps")
                    with gr.Column(visible=False) as base_col:
                        gr.Markdown("### Compared with" if backend.remote else "### Original LLaVA (frozen route)")
                        base_image = gr.Image(type="pil", format="png", label="Original LLaVA boxes",
                                              interactive=False, elem_id="base-image")
                        base_info = gr.Markdown(elem_id="base-info")
                        base_steps = gr.HTML(elem_id="base-steps")
                with gr.Accordion("Box data (JSON, original-image pixels)", open=False):
                    out_data = gr.JSON(label="TWIST", elem_id="twist-data")
                    base_data = gr.JSON(label="Original LLaVA", elem_id="base-data")
        compare.change(lambda on: gr.update(visible=bool(on)), compare, base_col, api_visibility="private")
        inputs = [image, query, route, compare, temperature, max_new_tokens, *models]
        outputs = [out_image, out_steps, out_info, out_data, base_image, base_steps, base_info, base_data]
        ask.click(backend.run, inputs, outputs, api_name="ask")
        query.submit(backend.run, inputs, outputs, api_visibility="private")
    demo.queue(default_concurrency_limit=backend.concurrency, max_size=MAX_QUEUE)
    return demo


def remote_model_pickers(backend: Backend) -> list[gr.Dropdown]:
    """In remote mode: the model to ask and the one to compare it with (the controller's list, refreshable)."""
    if backend.remote is None:
        return []
    names = backend.remote.names()
    twist_first = sorted(names, key=lambda n: "twist" not in n.lower())
    model = gr.Dropdown(names, value=twist_first[0] if names else None, label="Model", elem_id="model")
    other = gr.Dropdown(names, value=next((n for n in names if n != model.value), model.value),
                        label="Compare with", elem_id="other-model")
    refresh = gr.Button("Refresh the controller's models", size="sm", elem_id="refresh-models")

    def refreshed(current: str | None, current_other: str | None) -> tuple[Any, Any]:
        try:
            fresh = backend.remote.names()
        except PlaygroundError as exc:
            raise gr.Error(str(exc)) from exc
        keep = [c if c in fresh else (fresh[0] if fresh else None) for c in (current, current_other)]
        return gr.update(choices=fresh, value=keep[0]), gr.update(choices=fresh, value=keep[1])

    refresh.click(refreshed, [model, other], [model, other], api_visibility="private")
    return [model, other]


THEME_FONTS = dict(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
)


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_file_size: str | int = MAX_FILE_SIZE,
    block: bool = True,
    examples_dir: str | Path = EXAMPLES_DIR,
) -> gr.Blocks:
    """Serve ``demo``; only the example folder (and Gradio's own upload cache) can be read over HTTP."""
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(Path(examples_dir).resolve())],
        blocked_paths=[str(DATA_DIR)],
        max_file_size=max_file_size,
        ssr_mode=False,
        share=False,
        quiet=not block,
        footer_links=[],
        theme=gr.themes.Default(**THEME_FONTS),  # local fonts only: no request leaves the page
        css=CSS,
    )
    return demo


def create_remote_backend(controller_url: str) -> Backend:
    """A :class:`Backend` over the models a LLaVA controller lists (:mod:`playground.remote`)."""
    remote = RemoteModels(controller_url)
    names = remote.names()
    if not names:
        raise PlaygroundError(f"the controller at {controller_url} lists no models: start a worker first")
    description = (f"**Models** served through the LLaVA controller at {controller_url}: "
                   + ", ".join(f"`{n}`" for n in names))
    return Backend(None, description, remote=remote)


def create_backend(
    model_path: str | None = None, model_base: str | None = None, device: str = "auto", max_batch: int = MAX_BATCH,
    **load_kwargs: Any
) -> Backend:
    """Resolve and load the model (the demo's or the tiny one by default) behind a :class:`Backend`, with the
    example scenes of its world when it has them; ``max_batch`` users' answers are generated together."""
    source = resolve_model_source(model_path, model_base)
    loaded = load_model(source.model_path, source.model_base, device, **load_kwargs)
    examples = servable_examples(source.examples) if source.examples else None
    return Backend(loaded, describe_model(source, loaded), examples_dir=examples, max_batch=max_batch)

"""Generations shared between prompts: understanding and grounding prompts in one ``generate`` call each get the
text, route and router probability they get alone (both expert kinds, the KV cache, beams), and the batcher behind
the worker and the playground loses and mixes up nothing under a burst."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_twist.model.routes import Route
from llava_twist.serve.batching import Batcher, QueueFull
from llava_twist.serve.generation import GenerationSettings, _generation_kwargs, _left_padding, generate, stream_prompt
from llava_twist.serve.loading import LoadedModel, load_model
from llava_twist.serve.prompting import build_prompt, prepare_inputs
from llava_twist.serve.result import InferenceResult

QUESTIONS = ["What colour is the circle?", "Where is the red square? Answer step by step.",
             "Describe the picture in a few words.", "Find the star left of the square. Answer step by step."]


def same_answer(got: InferenceResult, want: InferenceResult) -> bool:
    """The same text and route, and the router's probability up to the rounding of a padded batch's pooling."""
    return (got.text, got.route, got.route_forced) == (want.text, want.route, want.route_forced) and (
        got.router_prob == pytest.approx(want.router_prob, rel=1e-4, abs=1e-7))


def image() -> Image.Image:
    picture = Image.new("RGB", (64, 48), (240, 240, 240))
    picture.paste((220, 30, 30), (8, 8, 30, 30))
    return picture


def loaded_twist(path: Path, expert: str) -> LoadedModel:
    """A TWIST model whose grounding experts differ from the frozen layers and whose router sends some of
    ``QUESTIONS`` down each route (its threshold between their probabilities)."""
    loaded = load_model(str(path), device="cpu", twist_expert=expert)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if ".twist_expert." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        loaded.model.get_model().twist_router.net[-1].weight.normal_(std=2.0, generator=gen)
    probs = sorted(generate(loaded, [q], [image()], GenerationSettings(max_new_tokens=1))[0].router_prob
                   for q in QUESTIONS)
    loaded.model.config.twist_router_threshold = (probs[1] + probs[2]) / 2
    return loaded


@pytest.mark.parametrize("expert", ["mlp", "layer"])
@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beams"])
def test_mixed_routes_in_one_batch_answer_as_alone(tiny_llava: Path, expert: str, beams: int) -> None:
    loaded = loaded_twist(tiny_llava, expert)
    settings = GenerationSettings(max_new_tokens=10, num_beams=beams)
    routes = [Route.AUTO, Route.AUTO, Route.GROUNDING, Route.AUTO]
    alone = [generate(loaded, [q], [image()], settings, routes=[r])[0] for q, r in zip(QUESTIONS, routes, strict=True)]
    together = generate(loaded, QUESTIONS, [image()] * len(QUESTIONS), settings, routes=routes, rows_apart=True)
    assert {a.route for a in alone} == {Route.FROZEN, Route.GROUNDING}  # the router splits the batch
    for one, batched in zip(alone, together, strict=True):
        assert same_answer(batched, one)
    assert [a.route_forced for a in alone] == [False, False, True, False]
    assert not hasattr(loaded.model, "twist_last_route")


def test_streamed_rows_answer_as_alone(tiny_llava: Path) -> None:
    loaded = loaded_twist(tiny_llava, "mlp")
    settings = GenerationSettings(max_new_tokens=10)
    alone = [generate(loaded, [q], [image()], settings)[0] for q in QUESTIONS]
    streamed = [list(stream_prompt(loaded, build_prompt(q), image(), settings)) for q in QUESTIONS]
    for one, items in zip(alone, streamed, strict=True):
        final = items[-1]
        assert isinstance(final, InferenceResult) and "".join(items[:-1]).strip() == final.text
        assert same_answer(final, one)


def ask(batcher: Batcher, question: str, route: Route, tokens: int) -> tuple[str, list, InferenceResult]:
    pieces, result = [], None
    for item in batcher.stream(build_prompt(question), image(), GenerationSettings(max_new_tokens=tokens,
                                                                                   route=route), label=question):
        if isinstance(item, InferenceResult):
            result = item
        else:
            pieces.append(item)
    return question, pieces, result


def test_thirty_concurrent_requests_none_lost_none_mixed(tiny_llava: Path) -> None:
    loaded = loaded_twist(tiny_llava, "mlp")
    requests = [(f"{QUESTIONS[i % 4]} ({i})", Route.GROUNDING if i % 3 == 0 else Route.AUTO, 4 + i % 5)
                for i in range(30)]
    expected = {q: list(stream_prompt(loaded, build_prompt(q), image(),
                                      GenerationSettings(max_new_tokens=n, route=r)))[-1] for q, r, n in requests}
    batcher = Batcher(loaded, max_batch=8, max_waiting=64)
    answers: dict[str, tuple] = {}
    start = threading.Barrier(len(requests))

    def client(question: str, route: Route, tokens: int) -> None:
        start.wait()
        answers[question] = ask(batcher, question, route, tokens)

    threads = [threading.Thread(target=client, args=r) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(answers) == len(requests)  # none lost
    for question, (asked, pieces, result) in answers.items():
        want = expected[question]
        assert asked == question and result.prompt == question
        assert same_answer(result, want)
        assert "".join(p for p, _ in pieces).strip() == result.text
        assert all(route == (result.route, result.router_prob, result.route_forced) for _, route in pieces)
    assert max(batcher.batch_sizes) <= 8 and max(batcher.batch_sizes) > 1 and sum(batcher.batch_sizes) == 30
    assert batcher.queue_length() == 0


def test_a_reader_that_leaves_frees_its_place(tiny_llava: Path) -> None:
    loaded = loaded_twist(tiny_llava, "mlp")
    batcher = Batcher(loaded, max_batch=2, max_waiting=1)
    stream = batcher.stream(build_prompt(QUESTIONS[0]), image(), GenerationSettings(max_new_tokens=200))
    next(stream)
    assert batcher.queue_length() == 1
    stream.close()
    assert batcher.queue_length() == 0
    _, _, result = ask(batcher, QUESTIONS[1], Route.AUTO, 6)  # the model is free again
    assert result is not None and batcher.queue_length() == 0


def test_a_request_past_the_queue_limit_is_refused_and_the_others_go_on(tiny_llava: Path) -> None:
    loaded = loaded_twist(tiny_llava, "mlp")
    batcher = Batcher(loaded, max_batch=1, max_waiting=1)
    running = batcher.stream(build_prompt(QUESTIONS[0]), image(), GenerationSettings(max_new_tokens=400))
    next(running)  # generating
    waiting: list[tuple] = []
    thread = threading.Thread(target=lambda: waiting.append(ask(batcher, QUESTIONS[1], Route.AUTO, 6)))
    thread.start()
    for _ in range(500):
        if batcher.queue_length() == 2:
            break
        threading.Event().wait(0.01)
    assert batcher.queue_length() == 2
    refused = batcher.stream(build_prompt(QUESTIONS[2]), image(), GenerationSettings(max_new_tokens=4))
    with pytest.raises(QueueFull, match=r"the queue is full \(1 waiting"):
        next(refused)
    assert batcher.queue_length() == 2  # the refused request took no place
    running.close()
    thread.join(timeout=120)
    assert waiting and waiting[0][2] is not None and batcher.queue_length() == 0


def decode_scores(loaded: LoadedModel, questions: list[str], beams: int, rows_apart: bool,
                  batched_products: bool = False, tokens: int = 8) -> tuple:
    inputs = prepare_inputs(loaded, questions, [image()] * len(questions))
    kwargs = _generation_kwargs(loaded, GenerationSettings(max_new_tokens=tokens, num_beams=beams),
                                rows_apart=rows_apart, batched_products=batched_products)
    with torch.inference_mode(), _left_padding(loaded.model):
        out = loaded.model.generate(inputs["input_ids"], images=inputs["images"], image_sizes=inputs["image_sizes"],
                                    attention_mask=inputs["attention_mask"], output_scores=True, **kwargs)
    width = inputs["input_ids"].shape[1]
    return out.sequences[:, width:], torch.stack(out.scores, dim=1)


@pytest.mark.parametrize(("dtype", "expert", "beams"), [(torch.float32, "mlp", 1), (torch.float16, "layer", 1),
                                                         (torch.float32, "layer", 2)])
def test_decode_steps_compute_each_prompt_as_alone(tiny_llava: Path, dtype: torch.dtype, expert: str,
                                                    beams: int) -> None:
    """Every new token's scores of every row of a batch (both routes, 5 prompts: a batched product of 5 rows rounds
    otherwise than a one-row one on CPU) are bit for bit the prompt's scores alone."""
    loaded = loaded_twist(tiny_llava, expert)
    loaded.model.to(dtype)
    questions = [*QUESTIONS, "How many objects are there?"]
    tokens, scores = decode_scores(loaded, questions, beams, rows_apart=True)
    for i, question in enumerate(questions):
        alone_tokens, alone_scores = decode_scores(loaded, [question], beams, rows_apart=False)
        steps = alone_scores.shape[1]
        rows = slice(i * beams, (i + 1) * beams)
        assert torch.equal(scores[rows, :steps], alone_scores), question
        if beams == 1:
            assert torch.equal(tokens[i, :alone_tokens.shape[1]], alone_tokens[0]), question


def test_batched_products_keep_attention_apart_and_multiply_decode_rows_together(tiny_llava: Path) -> None:
    """``batched_products``: each decode step of the rows-apart forward keeps each row's padding (attention per row)
    and leaves the products to one batched call (no rows per prompt), and the burst still answers every prompt."""
    from llava_twist.model.rows_apart import RowLinear

    loaded = loaded_twist(tiny_llava, "mlp")
    ctx = loaded.model.get_model().twist_context
    seen: list[tuple[bool, int]] = []
    head = loaded.model.lm_head
    assert isinstance(head, RowLinear)
    hook = head.register_forward_pre_hook(lambda module, args: seen.append((ctx.row_padding is not None,
                                                                          ctx.row_group)))
    try:
        for batched in (False, True):
            seen.clear()
            decode_scores(loaded, QUESTIONS, 1, rows_apart=True, batched_products=batched, tokens=3)
            assert seen and all(apart for apart, _ in seen)
            assert {group for _, group in seen} == ({0} if batched else {1})
    finally:
        hook.remove()
    batcher = Batcher(loaded, max_batch=8, batched_products=True)
    answers = {}
    threads = [threading.Thread(target=lambda q=q: answers.setdefault(q, ask(batcher, q, Route.AUTO, 5)))
               for q in QUESTIONS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(answers) == sorted(QUESTIONS) and all(a[0] == q and a[2].prompt == q for q, a in answers.items())
    assert batcher.queue_length() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_attention_computes_each_prompt_as_alone(tiny_llava: Path, dtype: torch.dtype) -> None:
    """A left-padded batch with row attention: each row's logits are bit for bit its logits alone. Without it the
    batch is LLaVA's own batched computation (the frozen route bit for bit ``LlavaLlamaForCausalLM`` on it)."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    loaded = load_model(str(tiny_llava), device="cpu", torch_dtype=dtype)
    base = LlavaLlamaForCausalLM.from_pretrained(str(tiny_llava), torch_dtype=dtype).eval()
    base.get_model().vision_tower = loaded.model.get_vision_tower()
    base.config.tokenizer_padding_side = "left"
    questions = ["What?", "Where is the red square left of the star? Answer step by step, please."]

    def logits(model, qs: list[str], **extra) -> torch.Tensor:
        inputs = prepare_inputs(loaded, qs, [image()] * len(qs))
        with torch.no_grad(), _left_padding(model):
            return model(inputs["input_ids"], attention_mask=inputs["attention_mask"], images=inputs["images"],
                         image_sizes=inputs["image_sizes"], position_ids=torch.zeros_like(inputs["input_ids"]),
                         **extra).logits

    rows = logits(loaded.model, questions, twist_rows_apart=1, twist_route="frozen")
    for i, question in enumerate(questions):
        alone = logits(loaded.model, [question], twist_route="frozen")[0]
        assert torch.equal(rows[i, -alone.shape[0]:], alone)
    batched = logits(loaded.model, questions, twist_route="frozen")
    assert torch.equal(batched, logits(base, questions))

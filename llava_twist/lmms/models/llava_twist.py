"""``--model llava_twist``: lmms-eval's own LLaVA wrapper, loading through TWIST's builder and reporting routes.

    python -m lmms_eval --model llava_twist --model_args pretrained=CKPT[,model_base=BASE][,twist_route=auto] ...

Everything but loading and the route report is lmms-eval's ``Llava`` (prompt template, image processing, greedy
generation, batching). Loading goes through :func:`llava_twist.model.builder.load_pretrained_model` with the
arguments lmms-eval's wrapper gives LLaVA's builder (float16, its ``device_map``, its attention implementation), so a
TWIST checkpoint on the frozen route answers as ``--model llava`` answers on its base. Each response is returned as a
``GenerationResult`` whose ``token_counts`` also hold ``twist_route`` and ``router_prob``: lmms-eval writes that
record beside the response in every ``--log_samples`` line, whatever the task.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

from llava_twist.lmms import require_lmms_eval

require_lmms_eval()

import torch  # noqa: E402
from accelerate import Accelerator, DistributedType, InitProcessGroupKwargs  # noqa: E402
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.models.simple.llava import Llava, best_fit_attn_implementation  # noqa: E402

from llava_twist.model.routes import AUTO, ROUTES  # noqa: E402


@dataclass
class RoutedTokenCounts(TokenCounts):
    """Token counts plus the route of the request: what lmms-eval logs per sample (``token_counts``)."""

    twist_route: str | None = None
    router_prob: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "twist_route": self.twist_route, "router_prob": self.router_prob}


def _stop(problem: str) -> NoReturn:
    """Bad ``--model_args``: one line and exit status 2 (lmms-eval prints a traceback for exceptions, then exits 0)."""
    print(f"error: --model llava_twist: {problem}", file=sys.stderr)
    raise SystemExit(2)


class DecisionRecorder:
    """The TWIST model as lmms-eval's ``Llava`` calls it, whose ``generate`` also keeps each call's route decision
    (TWIST's ``twist_decisions``); everything else is the model's. With :func:`route_rows`, the one place this plugin
    reads TWIST's routing API."""

    def __init__(self, model: Any) -> None:
        self.wrapped = model
        self.calls = 0
        self.last_decision: Any = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        decisions: list[Any] = []
        out = self.wrapped.generate(*args, twist_decisions=decisions, **kwargs)
        self.calls += 1
        self.last_decision = decisions[0] if decisions else None
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def route_rows(decision: Any, n: int) -> list[tuple[str, float | None]]:
    """Route and router probability of each of the ``n`` prompts of one ``generate`` (its prefill's decision)."""
    rows = 0 if decision is None else len(decision.routes())
    if not n or rows % n:
        raise RuntimeError(f"expected a route decision for {n} prompts after generate, got {rows}")
    step = rows // n  # beam search decides once per prompt and repeats it per beam
    routes, probs = decision.routes(), decision.probs()
    return [(str(routes[i * step]), probs[i * step]) for i in range(n)]


class LlavaTwist(Llava):
    """lmms-eval's ``llava`` model for TWIST checkpoints, grounding-only deltas (``model_base``) and plain LLaVA-1.5
    folders, with ``twist_route`` = ``auto`` (the router decides per prompt), ``frozen`` or ``grounding``."""

    def __init__(
        self,
        pretrained: str,
        model_base: str | None = None,
        twist_route: str = AUTO,
        truncation: bool = True,
        device: str = "cuda:0",
        batch_size: int | str = 1,
        model_name: str | None = None,
        attn_implementation: str | None = best_fit_attn_implementation,
        device_map: str = "cuda:0",
        conv_template: str = "vicuna_v1",
        use_cache: bool = True,
        tie_weights: bool = True,
        truncate_context: bool = False,
        **kwargs: Any,
    ) -> None:
        lmms.__init__(self)
        if kwargs:
            _stop(f"unknown model_args {', '.join(sorted(kwargs))} (known: pretrained, model_base, twist_route, "
                  "device, device_map, batch_size, conv_template, attn_implementation, model_name, use_cache)")
        if twist_route not in ROUTES:
            _stop(f"twist_route={twist_route!r}: expected one of {', '.join(ROUTES)}")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            _stop(f"batch_size={batch_size!r}: expected a positive integer")
        if self.batch_size_per_gpu < 1:
            _stop(f"batch_size={batch_size!r}: expected a positive integer")

        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
        self.accelerator = accelerator
        if accelerator.num_processes == 1 and device_map == "auto":
            self._device, self.device_map = torch.device(device), device_map
        else:
            self._device = torch.device(f"cuda:{accelerator.local_process_index}")
            self.device_map = f"cuda:{accelerator.local_process_index}"
        self._load(pretrained, model_base, model_name, twist_route, attn_implementation)
        self._config = self._model.config
        self.model.eval()
        if tie_weights:
            self.model.tie_weights()
        self.truncation = truncation
        self.conv_template = conv_template
        self.use_cache = use_cache
        self.truncate_context = truncate_context
        self._place(accelerator)

    @property
    def model(self) -> Any:
        """The model as ``Llava`` uses it, its ``generate`` recording route decisions (:class:`DecisionRecorder`)."""
        inner = Llava.model.fget(self)
        recorder = self.__dict__.get("_recorder")
        if recorder is None or recorder.wrapped is not inner:
            recorder = self.__dict__["_recorder"] = DecisionRecorder(inner)
        return recorder

    def _load(self, pretrained: str, model_base: str | None, model_name: str | None, twist_route: str,
              attn_implementation: str | None) -> None:
        """TWIST's builder, with what lmms-eval's ``Llava`` gives LLaVA's: float16 weights (``Llava`` casts images to
        float16 whatever the model), its device map, its attention implementation."""
        from llava.mm_utils import get_model_name_from_path

        from llava_twist.model.builder import load_pretrained_model, resolve_checkpoint

        extra = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
        try:
            pretrained = resolve_checkpoint(pretrained, "pretrained")
            model_base = None if model_base is None else resolve_checkpoint(model_base, "model_base")
            loaded = load_pretrained_model(
                pretrained, model_base, model_name or get_model_name_from_path(pretrained.rstrip("/")),
                device_map=self.device_map, device="cuda" if self._device.type == "cuda" else str(self._device),
                torch_dtype=torch.float16, twist_route=twist_route, **extra,
            )
        except (OSError, ValueError, KeyError) as exc:
            _stop(f"cannot load the model: {exc}")
        if twist_route == AUTO and loaded[1].config.twist_router == "none":
            _stop(f"pretrained={pretrained} has no router (twist_router none): pass twist_route=frozen or grounding")
        self._tokenizer, self._model, self._image_processor, self._max_length = loaded

    def _place(self, accelerator: Accelerator) -> None:
        """Data parallel over the launched processes, or one device (as lmms-eval's ``Llava``)."""
        if accelerator.num_processes > 1:
            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                _stop("DeepSpeed data parallelism is not supported; launch with accelerate's multi-GPU backend")
            if accelerator.distributed_type == DistributedType.FSDP:
                self._model = accelerator.prepare(self._model)
            else:
                self._model = accelerator.prepare_model(self._model, evaluation_mode=True)
            self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes
        else:
            if self.device_map != "auto":
                self.model.to(self._device)
            self._rank, self._world_size = 0, 1

    def _batches(self, requests: Sequence[Instance]) -> Iterator[list[int]]:
        """Indices of ``requests`` in batches of one task and generation settings, longest prompt first (the order
        ``Llava.generate_until`` sorts a batch in), so that each batch it is given runs as one ``generate`` in the
        order given. (``Llava`` alone groups by settings only, and reads a batch's images through its first
        request's task.)"""
        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs, _, _, task, split = req.args
            groups.setdefault((task, split, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(i)
        for indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            order = sorted(range(len(indices)), key=lambda k: (-len(self.tok_encode(contexts[k])), contexts[k]))
            ranked = [indices[k] for k in order]
            for start in range(0, len(ranked), self.batch_size):
                yield ranked[start:start + self.batch_size]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """``Llava.generate_until``, one batch at a time, each response with its prompt's route."""
        out: list[GenerationResult | None] = [None] * len(requests)
        for batch in self._batches(requests):
            calls = self.model.calls
            texts = super().generate_until([requests[i] for i in batch])
            if self.model.calls != calls + 1:
                raise RuntimeError(f"expected one generate for a batch of {len(batch)}, got {self.model.calls - calls}")
            decided = route_rows(self.model.last_decision, len(batch))
            for i, text, (route, prob) in zip(batch, texts, decided, strict=True):
                counts = RoutedTokenCounts(twist_route=route, router_prob=prob)
                out[i] = GenerationResult(text=text, token_counts=counts)
        return out  # type: ignore[return-value]

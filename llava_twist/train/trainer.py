"""`TwistTrainer`: LLaVA's trainer for TWIST. The loss is the model's own (step-weighted LM loss plus the
router's BCE), logged in parts and per step; optimizer groups over the trainable ``twist_`` parameters only, a
grounding-only delta at every save (a full checkpoint on request), and checkpoint resume under torch >= 2.6."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from llava.train.llava_trainer import LengthGroupedSampler, LLaVATrainer
from torch import nn
from torch.utils.data import RandomSampler, Sampler
from transformers import Trainer
from transformers.trainer_utils import has_length

from llava_twist.model.builder import apply_twist_delta, is_twist_delta, save_twist_delta, twist_state_dict
from llava_twist.train.steps import MAX_LOGGED_STEPS, SPAN_ANSWER, SPAN_OTHER, span_name

# LLaVA's builder picks its loader by the folder's name: one holding "llava" (and "v1" for run_llava's template)
# loads as plain LlavaLlamaForCausalLM, which ignores the twist_ weights, i.e. as the original model.
FULL_CHECKPOINT_DIR = "llava-v1.5-full"
_FIXED_METRICS = ("lm_loss", "router_loss", "router_acc")
_SPAN_SLOTS = [SPAN_OTHER, SPAN_ANSWER, *range(1, MAX_LOGGED_STEPS + 1)]
METRIC_NAMES = [*_FIXED_METRICS, *(f"loss_{span_name(s)}" for s in _SPAN_SLOTS)]


def span_slots(spans: torch.Tensor) -> torch.Tensor:
    """Metric slot (index into the span part of METRIC_NAMES) of each span id."""
    return spans.clamp(min=SPAN_OTHER, max=MAX_LOGGED_STEPS) - SPAN_OTHER


def numpy_rng_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must allow to read the numpy RNG state the Trainer saves."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def twist_param_groups(model: nn.Module, weight_decay: float, router_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters only: matrices decay; biases, norms and mixes do not; the
    router gets ``router_lr`` when given. Empty groups are left out (the LR scheduler crashes on them)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitions hold flat shards
            is_router = router_lr is not None and ".twist_router." in f".{name}"
            groups.setdefault((len(shape) >= 2, is_router), []).append(param)
    if not groups:
        raise ValueError("no trainable parameter: call freeze_all_but_twist on a TWIST model first")
    out = []
    for (decays, is_router), params in sorted(groups.items()):
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if is_router:
            group["lr"] = router_lr
        out.append(group)
    return out


class TwistTrainer(LLaVATrainer):
    """LLaVATrainer for TWIST (see the module docstring). Batches come from `TwistDataCollator`."""

    def __init__(
        self,
        *args: Any,
        save_full: bool = False,
        router_lr: float | None = None,
        twist_state_fn: Callable[[nn.Module], dict[str, torch.Tensor]] = twist_state_dict,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.twist_save_full = save_full
        self.twist_router_lr = router_lr
        self.twist_state_fn = twist_state_fn
        self._metric_sums: torch.Tensor | None = None  # (len(METRIC_NAMES), 2): sum, count since the last log

    # ----- loss -----
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False) -> Any:
        """The model's own loss (step-weighted LM loss plus the router's, :meth:`TwistLlavaLlamaForCausalLM.forward`,
        which also owns the route each sample takes), its parts recorded for the logs."""
        outputs = model(**inputs)
        self._record(outputs, inputs.get("twist_router_labels"))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    @torch.no_grad()
    def _record(self, outputs: Any, router_labels: torch.Tensor | None) -> None:
        lm_loss, ce, spans, supervised = (outputs.lm_loss, outputs.token_losses, outputs.token_spans,
                                          outputs.token_supervised)
        sums = torch.zeros(len(METRIC_NAMES), 2, device=ce.device, dtype=torch.float64)
        sums[0] = torch.stack([lm_loss.detach().double(), torch.ones((), device=ce.device, dtype=torch.float64)])
        if outputs.router_loss is not None:
            sums[1, 0], sums[1, 1] = outputs.router_loss.detach().double(), 1.0
        if outputs.router_logits is not None and router_labels is not None:
            correct = (outputs.router_logits.detach() > 0) == (router_labels.to(ce.device) > 0.5)
            sums[2, 0], sums[2, 1] = correct.sum(), correct.numel()
        slots = span_slots(spans)[supervised] + len(_FIXED_METRICS)
        sums[:, 0].index_add_(0, slots, ce[supervised].double())
        sums[:, 1].index_add_(0, slots, torch.ones_like(slots, dtype=torch.float64))
        self._metric_sums = sums if self._metric_sums is None else self._metric_sums + sums

    def log(self, logs: dict[str, float]) -> None:
        """Training logs also get ``lm_loss``, ``router_loss``, ``router_acc`` and ``loss_step_k`` /
        ``loss_answer`` / ``loss_other`` (token means since the last log, over all processes)."""
        if "loss" in logs:
            sums = self._metric_sums
            if sums is None:
                sums = torch.zeros(len(METRIC_NAMES), 2, dtype=torch.float64)
            sums = sums.to(self.args.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(sums)
            for name, (total, count) in zip(METRIC_NAMES, sums.tolist(), strict=True):
                if count > 0:
                    logs[name] = round(total / count, 6)
            self._metric_sums = None
        super().log(logs)

    # ----- data order -----
    def _get_train_sampler(self) -> Sampler | None:
        """LLaVA's samplers (length-grouped with ``--group_by_modality_length``, else random), their order drawn
        from a generator seeded with ``--seed``. Without one, accelerate gives a sampler under several processes a
        fresh generator of a fixed seed, and every ``--seed`` trains on the same order."""
        if self.train_dataset is None or not has_length(self.train_dataset):
            return None
        generator = torch.Generator().manual_seed(self.args.seed)
        if self.args.group_by_modality_length:
            return LengthGroupedSampler(
                self.args.train_batch_size,
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                lengths=self.train_dataset.modality_lengths,
                generator=generator,
                group_by_modality=True,
            )
        return RandomSampler(self.train_dataset, generator=generator)

    # ----- optimizer -----
    def create_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
            groups = twist_param_groups(self.model, self.args.weight_decay, self.twist_router_lr)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ----- saving and resuming -----
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The grounding-only delta in ``output_dir`` (every save); with ``save_full`` also a full TWIST
        checkpoint in ``output_dir/llava-v1.5-full`` (:data:`FULL_CHECKPOINT_DIR`). Call on every process (ZeRO-3
        gathers)."""
        output_dir = output_dir or self.args.output_dir
        state = self.twist_state_fn(self.model)
        if self.args.should_save:
            save_twist_delta(self.model, output_dir, state=state)
        if self.twist_save_full:
            super().save_model(os.path.join(output_dir, FULL_CHECKPOINT_DIR), _internal_call=_internal_call)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume without DeepSpeed: the checkpoint's weights are its TWIST delta (DeepSpeed restores its own)."""
        model = model or self.model
        if not is_twist_delta(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        if any(".lora_" in name for name, _ in model.named_parameters()):
            raise ValueError(
                f"{resume_from_checkpoint}: resuming a --twist_lora_r run needs DeepSpeed (its checkpoint holds "
                "the adapters; the delta has them merged)"
            )
        apply_twist_delta(model, resume_from_checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # transformers 4.37.2 reads rng_state*.pth with a bare torch.load; torch >= 2.6 defaults to
        # weights_only=True, which refuses the numpy RNG state in it unless these globals are allowed.
        with torch.serialization.safe_globals(numpy_rng_globals()):
            super()._load_rng_state(checkpoint)

"""TWIST model classes: LLaVA-1.5 (Llama) with twin-expert decoder layers and a per-prompt router."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from llava.constants import IGNORE_INDEX
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM, LlavaLlamaModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.utils import ModelOutput

from llava_twist.model.config import TWIST_MODEL_TYPE, TwistConfig
from llava_twist.model.loss import align_span_ids, stepwise_lm_loss
from llava_twist.model.routers import router_for
from llava_twist.model.routes import Route
from llava_twist.model.routing import (
    RouteContext,
    RouteDecision,
    TwistCache,
    TwistRouter,
    class_balanced_weights,
    mark_router_positions,
    requested_routes,
    route_codes,
    split_router_marks,
)
from llava_twist.model.rows_apart import RowLinear, keep_rows_apart, left_padding
from llava_twist.model.twin_layer import TwinMix, TwistDecoderLayer, TwistOutputHead

RouteArg = Route | str | Sequence[Route | str] | torch.Tensor | None


@dataclass
class TwistModelOutput(BaseModelOutputWithPast):
    router_logits: torch.Tensor | None = None
    route: torch.Tensor | None = None
    gate_logits: tuple[torch.Tensor, ...] | None = None
    twist_decision: RouteDecision | None = None  # the prefill's decision (None at decode steps)


@dataclass
class TwistCausalLMOutput(CausalLMOutputWithPast):
    """``loss`` is the step-weighted LM loss plus the weighted router loss; the per-token next-token losses
    (``token_losses``, (B, T-1)), their span ids and which were supervised come along for logging."""

    lm_loss: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    route: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None
    token_spans: torch.Tensor | None = None
    token_supervised: torch.Tensor | None = None
    twist_decision: RouteDecision | None = None  # the prefill's decision (None at decode steps)


@dataclass
class TwistInputs:
    """LLaVA's multimodal inputs with TWIST's router positions and chain span ids carried through the splice."""

    input_ids: torch.Tensor | None
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    past_key_values: Any
    inputs_embeds: torch.Tensor | None
    labels: torch.Tensor | None
    router_mask: torch.Tensor | None
    span_ids: torch.Tensor | None


def is_twist_param(name: str) -> bool:
    """True for the weights TWIST adds (and trains): every name with a ``twist_`` component."""
    return any(part.startswith("twist_") for part in name.split("."))


class TwistLlavaLlamaModel(LlavaLlamaModel):
    config_class = TwistConfig

    def __init__(self, config: TwistConfig) -> None:
        super().__init__(config)
        self.twist_context = RouteContext()
        self.router_kind = router_for(config)
        router_layer = config.router_layer_index()
        self.twin_layers = config.twin_layer_indices()
        for i in self.twin_layers:
            self.layers[i] = TwistDecoderLayer(config, i, self.twist_context, is_router_layer=i == router_layer,
                                               router_kind=self.router_kind)
        self.router_in_pass = router_layer == self.twin_layers[0]
        self.twist_router = self.router_kind.build_head()
        n = config.num_hidden_layers
        for i, layer in enumerate(self.layers):
            expert = getattr(layer, "twist_expert", None)
            if expert is not None:
                keep_rows_apart(expert, self.twist_context, config, i + n)
            keep_rows_apart(layer, self.twist_context, config, i)

    def twin_decoder_layers(self) -> list[TwistDecoderLayer]:
        return [self.layers[i] for i in self.twin_layers]

    def reset_twist_router_and_mix(self) -> None:
        if self.twist_router is not None:
            self.router_kind.reset_head(self.twist_router)
        for layer in self.twin_decoder_layers():
            for mix in layer.mixes():
                mix.reset(self.config)

    def _requested_route(self, twist_route: RouteArg, batch: int, device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples forced, their routes) (:func:`requested_routes`), checked against what the router kind does."""
        forced, route = requested_routes(twist_route, batch, device)
        if not bool(forced.all()):
            kind = self.router_kind
            if not kind.decides:
                raise ValueError(f"this TWIST model's router kind ({kind.name}) takes forced routes only: force "
                                 "twist_route")
            if kind.gates and bool(forced.any()):
                raise ValueError(f"the router kind {kind.name} gates every token: it cannot mix forced and auto "
                                 "routes in one batch")
        return forced, route

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        twist_route: RouteArg = None,
        twist_router_mask: torch.Tensor | None = None,
        twist_rows_apart: int = 0,
        twist_batched_products: bool = False,
    ) -> TwistModelOutput:
        """``twist_rows_apart``: the rows of each prompt (1, or its beams), which then compute bit for bit what they
        compute alone (:mod:`llava_twist.model.rows_apart`); 0: LLaVA's batched computation.
        ``twist_batched_products``: with rows apart, keep the attention per row but multiply a decode step's rows in
        one product (faster in float16; a row's rounding then depends on the batch)."""
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, device = ref.shape[0], ref.device
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        cache = None
        if use_cache:
            cache = past_key_values
            if not isinstance(cache, TwistCache):
                cache = TwistCache.from_legacy(past_key_values)
            cache.begin_step()

        forced, forced_route = self._requested_route(
            twist_route if twist_route is not None else self.config.twist_route, batch, device)
        all_forced = bool(forced.all())
        route = forced_route if all_forced else None
        decode_step = cache is not None and cache.route is not None
        if decode_step:
            if not torch.equal(forced_route[forced], cache.route[forced]):
                raise ValueError(
                    "twist_route differs from the route this KV cache was built on; start a new sequence to change it"
                )
            route = cache.route
        kind = self.router_kind
        token_gate = kind.gates and route is None
        if token_gate:
            route = torch.ones(batch, dtype=torch.bool, device=device)

        deciding = kind.per_prompt and not decode_step  # the prefill decided; decode steps keep its decision
        router_logits = None
        if route is None and not self.router_in_pass:
            router_logits = self._prefill_router(input_ids, attention_mask, position_ids, inputs_embeds,
                                                 twist_router_mask)
            route = torch.where(forced, forced_route, kind.decide(router_logits))
            deciding = False

        ctx = self.twist_context
        ctx.begin(route, kind if deciding else None, self.twist_router, twist_router_mask,
                  compute_both=is_deepspeed_zero3_enabled() or self.training, token_gate=token_gate,
                  forced=None if all_forced else (forced, forced_route),
                  row_padding=left_padding(attention_mask) if twist_rows_apart and attention_mask is not None
                  and attention_mask.dim() == 2 else None,
                  row_group=0 if twist_batched_products else int(twist_rows_apart))
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        router_logits = ctx.router_logits if router_logits is None else router_logits
        route = ctx.route
        if cache is not None:
            cache.route = route
        decision = None
        if not decode_step:
            prob = torch.sigmoid(router_logits) if router_logits is not None else route.float() if all_forced else None
            decision = RouteDecision(prob=None if prob is None else prob.detach(), grounding=route.detach(),
                                     forced=forced)
        return TwistModelOutput(
            last_hidden_state=out.last_hidden_state,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=router_logits,
            route=route,
            gate_logits=tuple(ctx.gate_logits) or None,
            twist_decision=decision,
        )

    def _prefill_router(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        router_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Router reading a layer after the first twin layer: a frozen-route prefill to get there."""
        ref = input_ids if input_ids is not None else inputs_embeds
        frozen = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
        self.twist_context.begin(frozen, None, None, None, compute_both=False)
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=True,
            return_dict=True,
        )
        return self.router_kind.logits(self.twist_router, out.hidden_states[self.config.router_layer_index()],
                                       router_mask)


class TwistLlavaLlamaForCausalLM(LlavaLlamaForCausalLM):
    """LLaVA-1.5 with TWIST. ``twist_route`` on ``forward``/``generate``: ``"auto"`` (the router decides,
    per prompt), ``"frozen"`` (the exact original LLaVA), ``"grounding"``, or a bool tensor per sample."""

    config_class = TwistConfig

    def __init__(self, config: TwistConfig) -> None:
        super(LlamaForCausalLM, self).__init__(config)
        self.model = TwistLlavaLlamaModel(config)
        self.pretraining_tp = config.pretraining_tp
        self.vocab_size = config.vocab_size
        ctx = self.model.twist_context
        self.lm_head = (TwistOutputHead(config.hidden_size, config.vocab_size, ctx) if config.twist_head
                        else RowLinear(config.hidden_size, config.vocab_size, bias=False, ctx=ctx))
        keep_rows_apart(self.lm_head, ctx)
        self.post_init()
        self.model.reset_twist_router_and_mix()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, TwistRouter):
            module.reset()
        elif isinstance(module, TwinMix):
            module.reset(self.config)
        else:
            super()._init_weights(module)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        images: torch.FloatTensor | None = None,
        image_sizes: list[list[int]] | None = None,
        return_dict: bool | None = None,
        twist_route: RouteArg = None,
        twist_router_mask: torch.Tensor | None = None,
        twist_router_labels: torch.Tensor | None = None,
        twist_step_ids: torch.Tensor | None = None,
        twist_rows_apart: int = 0,
        twist_batched_products: bool = False,
    ) -> TwistCausalLMOutput | tuple:
        """LLaVA's forward with a route and, given ``labels``, the model's whole training loss:
        ``twist_step_ids`` (span ids of the text labels, :mod:`llava_twist.model.loss`) weigh the LM loss by
        ``config.twist_step_weights``; ``twist_router_labels`` (1: grounding) add the router's BCE times
        ``config.twist_router_loss_weight``. Under the per-token gate (``twist_router="token"``) those labels teach
        the gates, so the gates route every token: a ``twist_route`` passed with them (the samples' tasks) is not
        forced."""
        if twist_router_labels is not None and self.model.router_kind.gates:
            twist_route = None
        span_ids = twist_step_ids
        if inputs_embeds is None:
            t = self.twist_inputs(input_ids, position_ids, attention_mask, past_key_values, labels, twist_step_ids,
                                  images, image_sizes)
            input_ids, position_ids, attention_mask, past_key_values, inputs_embeds = (
                t.input_ids, t.position_ids, t.attention_mask, t.past_key_values, t.inputs_embeds)
            labels, twist_router_mask, span_ids = t.labels, t.router_mask, t.span_ids

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            twist_route=twist_route,
            twist_router_mask=twist_router_mask,
            twist_rows_apart=twist_rows_apart,
            twist_batched_products=twist_batched_products,
        )
        hidden_states = outputs.last_hidden_state
        if self.config.pretraining_tp > 1:
            slices = self.lm_head.weight.split(self.vocab_size // self.config.pretraining_tp, dim=0)
            logits = torch.cat([F.linear(hidden_states, s) for s in slices], dim=-1)
        else:
            logits = self.lm_head(hidden_states)
        logits = logits.float()

        lm_loss = router_loss = token_losses = token_spans = supervised = None
        if labels is not None:
            lm_loss, token_losses, token_spans = stepwise_lm_loss(logits, labels, span_ids, self.config.step_weights)
            supervised = labels[:, 1:].to(token_losses.device) != IGNORE_INDEX
        if twist_router_labels is not None:
            router_loss = self.router_loss(outputs, twist_router_labels)
        loss = lm_loss
        if router_loss is not None:
            weighted = self.config.twist_router_loss_weight * router_loss
            loss = weighted if loss is None else loss + weighted

        if not (return_dict if return_dict is not None else self.config.use_return_dict):
            output = (logits, outputs.past_key_values)
            return (loss,) + output if loss is not None else output
        return TwistCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            router_loss=router_loss,
            router_logits=outputs.router_logits,
            route=outputs.route,
            token_losses=token_losses,
            token_spans=token_spans,
            token_supervised=supervised,
            twist_decision=outputs.twist_decision,
        )

    def twist_inputs(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        labels: torch.Tensor | None,
        step_ids: torch.Tensor | None,
        images: torch.Tensor | None,
        image_sizes: Any = None,
    ) -> TwistInputs:
        """Mark the router's positions, splice the image in (LLaVA's ``prepare_inputs_labels_for_multimodal``),
        split the marks back out and carry the span ids onto the new labels: once, for training and generation."""
        marked = mark_router_positions(input_ids, labels, attention_mask)
        input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, marked = (
            self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, marked, images, image_sizes
            )
        )
        mm_labels, router_mask = split_router_marks(marked, labels is not None)
        spans = None
        if step_ids is not None and labels is not None and mm_labels is not None:
            spans = align_span_ids(labels, step_ids, mm_labels)
        return TwistInputs(input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, mm_labels,
                           router_mask, spans)

    def router_loss(self, outputs: TwistModelOutput, router_labels: torch.Tensor) -> torch.Tensor | None:
        """BCE of the router (or, for the per-token ablation, of every gate) on the sample's task label; class
        balanced when ``config.twist_router_balance``."""
        target = router_labels.float()
        weight = class_balanced_weights(target) if self.config.twist_router_balance else None
        return self.model.router_kind.loss(outputs, target, weight)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        twist_route: RouteArg = None,
        **kwargs: Any,
    ) -> Any:
        """LLaVA's ``generate`` with a route: ``twist_route`` as for :meth:`forward`, or one route per prompt (auto
        and forced routes mixed). With ``return_dict_in_generate=True`` the output also carries ``twist_decision``,
        the :class:`RouteDecision` of each row of ``sequences`` (route, router probability, forced); nothing of the
        call stays on the model. A streamer that needs the decision before the end passes an empty list as
        ``twist_decisions``: the prefill's decision (over its rows) is appended to it right after the first token.
        ``twist_rows_apart=True`` makes each prompt of a left-padded batch generate what it generates alone."""
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("`inputs_embeds` is not supported")
        if isinstance(twist_route, (list, tuple)):  # one per prompt: codes, which generate repeats for beams
            twist_route = route_codes(twist_route, inputs.device)
        t = self.twist_inputs(inputs, position_ids, attention_mask, None, None, None, images, image_sizes)
        embeds = t.inputs_embeds if t.inputs_embeds is not None else self.get_model().embed_tokens(t.input_ids)
        decisions = kwargs.pop("twist_decisions", None)
        decisions = [] if decisions is None else decisions
        if kwargs.get("twist_rows_apart") is True:  # each prompt's rows: its beams
            kwargs["twist_rows_apart"] = kwargs.get("num_beams") or self.generation_config.num_beams or 1
        out = super(LlavaLlamaForCausalLM, self).generate(
            position_ids=t.position_ids,
            attention_mask=t.attention_mask,
            inputs_embeds=embeds,
            twist_route=twist_route,
            twist_router_mask=t.router_mask,
            twist_decisions=decisions,
            **kwargs,
        )
        if isinstance(out, ModelOutput) and decisions:
            out["twist_decision"] = decisions[0].rows(embeds.shape[0], out.sequences.shape[0])
        return out

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: dict[str, Any], *args: Any,
                                            **kwargs: Any) -> dict[str, Any]:
        """Keeps the prefill's route decision in this call's ``twist_decisions`` (see :meth:`generate`)."""
        decisions = model_kwargs.get("twist_decisions")
        decision = getattr(outputs, "twist_decision", None)
        if decisions is not None and not decisions and decision is not None:
            decisions.append(decision)
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        twist_decisions: list[RouteDecision] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        twist_route = kwargs.pop("twist_route", None)
        router_mask = kwargs.pop("twist_router_mask", None)
        rows_apart = kwargs.pop("twist_rows_apart", 0)
        batched_products = kwargs.pop("twist_batched_products", False)
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        inputs["twist_route"] = twist_route
        inputs["twist_rows_apart"] = rows_apart
        inputs["twist_batched_products"] = batched_products
        if past_key_values is None:
            inputs["twist_router_mask"] = router_mask
        return inputs


AutoConfig.register(TWIST_MODEL_TYPE, TwistConfig)
AutoModelForCausalLM.register(TwistConfig, TwistLlavaLlamaForCausalLM)

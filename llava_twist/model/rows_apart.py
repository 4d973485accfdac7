"""Each prompt of a batch computed bit for bit as alone, so a greedy answer is the same text batched or alone.

Two things round a row of a batch otherwise than the row alone, and each has its class here:

- attention over a left-padded row: its masked padding keys shift how the kernel groups its sums (float16 answers
  drifted from the unpadded ones at a near tie). :class:`RowAttention` computes the projections, rotary embedding
  and KV cache for the whole batch, as Llama's SDPA attention does, and the attention itself per row on the row's
  own queries and keys, as the row alone would (no mask; causal when the queries are many);
- a decode step's matrix products: CPU kernels multiply one row (a matrix-vector product, what a prompt alone
  computes at each new token) otherwise than several (``F.linear`` of 1 row against the same row among 8: unequal in
  float32 and float16 on the CPUs measured; from 4 rows on the sums agree, so a prompt's products are the same
  batched or alone). :class:`RowLinear` gives each prompt's rows (one, or its beams) the product they get alone:
  in float32 one batched matrix-vector product per row (``torch.bmm`` on the shared weight, bit for bit the
  one-row product and about the cost of the batched one), otherwise one product per prompt.

Both engage only when the forward is told how many rows each prompt has (``RouteContext.row_group``, from
``generate(..., twist_rows_apart=True)``); otherwise they are Llama's attention and ``nn.Linear`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import LlamaSdpaAttention, apply_rotary_pos_emb, repeat_kv

from llava_twist.model.routing import RouteContext


def left_padding(attention_mask: torch.Tensor) -> list[int]:
    """Each row's left padding: the zeros before its first attended position in a (B, T) mask."""
    attended = attention_mask.bool()
    first = torch.where(attended.any(dim=1), attended.int().argmax(dim=1), torch.zeros_like(attended[:, 0]).long())
    return [int(p) for p in first.tolist()]


class RowAttention(LlamaSdpaAttention):
    """Llama's SDPA attention (same weights and names), per row under a left-padded batch (see the module)."""

    def __init__(self, config: Any, layer_idx: int, ctx: RouteContext) -> None:
        super().__init__(config, layer_idx)
        self._ctx = ctx

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_value: Any = None,
        output_attentions: bool = False,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, Any]:
        padding = self._ctx.row_padding
        if padding is None or output_attentions or not any(padding):
            return super().forward(hidden_states, attention_mask, position_ids, past_key_value, output_attentions,
                                   use_cache, **kwargs)
        bsz, q_len, _ = hidden_states.size()
        heads, kv_heads = self.num_heads, self.num_key_value_heads
        query_states = self.q_proj(hidden_states).view(bsz, q_len, heads, self.head_dim).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(bsz, q_len, kv_heads, self.head_dim).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(bsz, q_len, kv_heads, self.head_dim).transpose(1, 2)
        kv_seq_len = key_states.shape[-2]
        if past_key_value is not None:
            kv_seq_len += past_key_value.get_usable_length(kv_seq_len, self.layer_idx)
        cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
        if past_key_value is not None:
            key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx,
                                                             {"sin": sin, "cos": cos})
        key_states = repeat_kv(key_states, self.num_key_value_groups)
        value_states = repeat_kv(value_states, self.num_key_value_groups)
        past = key_states.shape[-2] - q_len
        attn_output = query_states.new_zeros(query_states.shape)
        for row, pad in enumerate(padding):
            first_query = max(0, pad - past)
            queries = query_states[row:row + 1, :, first_query:]
            attn_output[row:row + 1, :, first_query:] = F.scaled_dot_product_attention(
                queries, key_states[row:row + 1, :, pad:], value_states[row:row + 1, :, pad:],
                dropout_p=self.attention_dropout if self.training else 0.0,
                is_causal=self.is_causal and queries.shape[-2] > 1,
            )
        attn_output = attn_output.transpose(1, 2).contiguous().reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(attn_output), None, past_key_value


class RowLinear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose decode steps give each prompt's rows the product they get
    alone (see the module)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: RouteContext) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._ctx = ctx

    @classmethod
    def sharing(cls, linear: nn.Linear, ctx: RouteContext) -> RowLinear:
        """A :class:`RowLinear` over ``linear``'s own parameters (nothing allocated, nothing copied)."""
        row = cls.__new__(cls)
        nn.Module.__init__(row)
        row.in_features, row.out_features = linear.in_features, linear.out_features
        row.weight, row.bias = linear.weight, linear.bias
        row._ctx = ctx
        return row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._ctx.row_group
        if not group or x.dim() != 3 or x.shape[1] != 1 or x.shape[0] <= group:
            return super().forward(x)
        if group == 1 and x.dtype == torch.float32 and self.bias is None:
            weight = self.weight.t()
            return torch.bmm(x, weight.expand(x.shape[0], *weight.shape))
        return torch.cat([super(RowLinear, self).forward(x[i:i + group]) for i in range(0, x.shape[0], group)])


def keep_rows_apart(module: nn.Module, ctx: RouteContext, config: Any = None, layer_idx: int | None = None) -> None:
    """Give ``module`` (a decoder layer, an output head) the classes of this module: every plain ``nn.Linear`` in
    it becomes a :class:`RowLinear` over the same parameters and, with ``config`` and ``layer_idx``, Llama's SDPA
    attention becomes :class:`RowAttention` (other attention kinds stay)."""
    if config is not None and type(getattr(module, "self_attn", None)) is LlamaSdpaAttention:
        module.self_attn = RowAttention(config, layer_idx, ctx)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, RowLinear.sharing(child, ctx))

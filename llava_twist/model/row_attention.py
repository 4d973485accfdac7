"""Attention that keeps each row of a left-padded batch to its own tokens, so the row computes bit for bit what it
computes alone.

Batched matrix products give each row the bits it gets alone, but attention over a left-padded row does not: its
masked padding keys shift how the kernel groups its sums, and float16 answers drift from the unpadded ones at a
near tie (6 of 8 greedy answers of a tiny base stayed the same). :class:`RowAttention` computes the projections,
rotary embedding and KV cache for the whole batch, as Llama's SDPA attention does, and runs the attention itself
per row on the row's own queries and keys, as the row alone would (no mask; causal when the queries are many).
It engages only when the forward is told each row's padding (``RouteContext.row_padding``, from
``generate(..., twist_row_attention=True)``); otherwise it is Llama's SDPA attention unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
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


def use_row_attention(layer: Any, config: Any, layer_idx: int, ctx: RouteContext) -> None:
    """Give a decoder layer :class:`RowAttention` in place of Llama's SDPA attention (other kinds stay)."""
    if type(layer.self_attn) is LlamaSdpaAttention:
        layer.self_attn = RowAttention(config, layer_idx, ctx)

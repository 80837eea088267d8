"""The sdpa backend: ``F.scaled_dot_product_attention(..., enable_gqa=True)``, PyTorch's fused kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.attention.bias import bias_tile
from kvlab.attention.kernels.common import check_shapes, positional_bias_needs_mask
from kvlab.attention.masks import AttentionMask
from kvlab.registry import Backend, register_backend

# A few queries per row with grouped heads (decoding) are folded into one query block per KV head:
# the G query heads that read a KV head become G·Tq rows of one head, so each KV head is one matrix
# product. With values narrower or wider than keys PyTorch's CPU kernels otherwise fall back to a
# path that copies K and V for every query head (15x slower measured at 4k context: B 8, 8 heads, one
# KV head, 80-wide keys, 64-wide values); with equal widths enable_gqa does not copy, and the folded
# product is no slower: SmolLM2's decode step at batch 4 measured 0.93-1.01x at 512 tokens and
# 0.98-0.99x at 2,048 over two runs (benchmarks/fold_decode.py), within this VM's spread.
FOLD_MAX_QUERIES = 16


def _attend(q, k, v, attn_mask, scale):
    B, Hq, Tq, _ = q.shape
    Hkv = k.shape[1]
    if Hq == Hkv or Tq > FOLD_MAX_QUERIES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=True)
    G = Hq // Hkv
    qf = q.reshape(B, Hkv, G * Tq, q.shape[-1])            # query head h = hk·G + g: rows g·Tq .. g·Tq+Tq-1
    if attn_mask is not None:
        m = attn_mask
        if m.shape[1] == 1:
            m = m.unsqueeze(2).expand(m.shape[0], 1, G, Tq, m.shape[-1])
        else:
            m = m.reshape(m.shape[0], Hkv, G, Tq, m.shape[-1])
        attn_mask = m.reshape(m.shape[0], m.shape[1], G * Tq, m.shape[-1])
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=attn_mask, scale=scale)
    return out.reshape(B, Hq, Tq, v.shape[-1])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: AttentionMask | None, scale: float, bias=None) -> torch.Tensor:
    check_shapes(q, k, v)
    if bias is None:
        if mask is None:
            return _attend(q, k, v, None, scale)
        if mask.plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        attn_mask = mask.dense()
    else:
        # A float mask is added to the scores: the bias where attending is allowed, -inf elsewhere.
        attn_mask = bias_tile(bias, mask, 0, q.shape[2], 0, k.shape[2]).to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask.dense(), float("-inf"))
    out = _attend(q, k, v, attn_mask, scale)
    # Rows with no allowed key are NaN or 0 depending on the SDPA kernel; make them 0 everywhere.
    return out if mask is None else out.masked_fill(~mask.row_has_keys(), 0.0)


def _supports(q, k, v, mask, bias) -> str | None:
    return positional_bias_needs_mask(mask, bias)


register_backend(Backend("sdpa", sdpa_attention, _supports, auto_rank=lambda q: 10))

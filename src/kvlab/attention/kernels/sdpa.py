"""The sdpa backend: ``F.scaled_dot_product_attention(..., enable_gqa=True)``, PyTorch's fused kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.attention.bias import bias_tile
from kvlab.attention.kernels.common import check_shapes, positional_bias_needs_mask
from kvlab.attention.masks import AttentionMask
from kvlab.registry import Backend, register_backend


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: AttentionMask | None, scale: float, bias=None) -> torch.Tensor:
    check_shapes(q, k, v)
    if bias is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        if mask.plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        attn_mask = mask.dense()
    else:
        # A float mask is added to the scores: the bias where attending is allowed, -inf elsewhere.
        attn_mask = bias_tile(bias, mask, 0, q.shape[2], 0, k.shape[2]).to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask.dense(), float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=True)
    # Rows with no allowed key are NaN or 0 depending on the SDPA kernel; make them 0 everywhere.
    return out if mask is None else out.masked_fill(~mask.row_has_keys(), 0.0)


def _supports(q, k, v, mask, bias) -> str | None:
    return positional_bias_needs_mask(mask, bias)


register_backend(Backend("sdpa", sdpa_attention, _supports, auto_rank=lambda q: 10))

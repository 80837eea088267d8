"""The reference backend: plain math with the score matrix materialized — the oracle of the tests."""

from __future__ import annotations

import torch

from kvlab.attention.bias import bias_tile, grouped
from kvlab.attention.kernels.common import check_shapes, positional_bias_needs_mask
from kvlab.attention.masks import AttentionMask
from kvlab.registry import Backend, register_backend


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: AttentionMask | None, scale: float, bias=None) -> torch.Tensor:
    """In fp32 (fp64 for fp64 inputs). Queries are grouped, ``(B, Hkv, G·Tq, D)``, so each KV head
    multiplies its whole group in one matmul without a repeated copy of K or V."""
    group = check_shapes(q, k, v)
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).reshape(B, Hkv, group * Tq, D)
    scores = (qg @ k.to(acc).transpose(-1, -2)) * scale                 # (B, Hkv, G·Tq, Tk)
    scores = scores.view(B, Hkv, group, Tq, Tk)
    b = bias_tile(bias, mask, 0, Tq, 0, Tk)
    if b is not None:
        scores = scores + grouped(b.to(acc), Hkv)
    if mask is not None:
        allowed = mask.dense().unsqueeze(1)                               # (B, 1, 1, Tq, Tk)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~allowed, 0.0)   # all-masked rows: NaN -> 0
    out = probs.reshape(B, Hkv, group * Tq, Tk) @ v.to(acc)
    return out.view(B, Hq, Tq, Dv).to(q.dtype)


def _supports(q, k, v, mask, bias) -> str | None:
    return positional_bias_needs_mask(mask, bias)


register_backend(Backend("reference", reference_attention, _supports, auto_rank=lambda q: 0))

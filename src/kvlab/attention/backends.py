"""Attention backends: interchangeable functions with one signature.

``fn(q, k, v, mask, scale) -> out`` with ``q (B, n_head, Tq, D)``, ``k, v (B, n_kv_head, Tk, D)``,
``mask`` an :class:`~kvlab.attention.masks.AttentionMask` or ``None`` (attend to every key), and
``out (B, n_head, Tq, D)`` in q's dtype. Query head ``h`` reads KV head ``h // G`` with
``G = n_head // n_kv_head``. No backend repeats K or V per query head: the KV-cache saving of
GQA/MQA is only real if each KV head is read once for its whole query group.

Register a new backend (tiled flash, Triton...) with :func:`register_backend`.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from kvlab.attention.masks import AttentionMask
from kvlab.errors import ConfigError

log = logging.getLogger(__name__)

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "AttentionMask | None", float], torch.Tensor]
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    def deco(fn: Backend) -> Backend:
        BACKENDS[name] = fn
        return fn
    return deco


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate the (B, H, T, D) layout and return the group size G."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ConfigError(f"attention expects 4-D (B, heads, T, head_dim) tensors, got q{tuple(q.shape)} "
                          f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ConfigError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ConfigError(f"q{tuple(q.shape)} and k{tuple(k.shape)} differ in batch or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ConfigError(f"n_head={q.shape[1]} is not divisible by n_kv_head={k.shape[1]}")
    return q.shape[1] // k.shape[1]


@register_backend("reference")
def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: AttentionMask | None, scale: float) -> torch.Tensor:
    """Plain math with the score matrix materialized, in fp32 (fp64 for fp64 inputs): the oracle.

    Queries are grouped, ``(B, Hkv, G·Tq, D)``, so each KV head multiplies its whole group in one
    matmul without a repeated copy of K or V.
    """
    group = check_shapes(q, k, v)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).reshape(B, Hkv, group * Tq, D)
    scores = (qg @ k.to(acc).transpose(-1, -2)) * scale                 # (B, Hkv, G·Tq, Tk)
    scores = scores.view(B, Hkv, group, Tq, Tk)
    if mask is not None:
        allowed = mask.dense().unsqueeze(1)                               # (B, 1, 1, Tq, Tk)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~allowed, 0.0)   # all-masked rows: NaN -> 0
    out = probs.view(B, Hkv, group * Tq, Tk) @ v.to(acc)
    return out.view(B, Hq, Tq, D).to(q.dtype)


@register_backend("sdpa")
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: AttentionMask | None, scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention(..., enable_gqa=True)``: PyTorch's fused kernels."""
    check_shapes(q, k, v)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    if mask.plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), scale=scale, enable_gqa=True)
    # Rows with no allowed key are NaN or 0 depending on the SDPA kernel; make them 0 everywhere.
    return out.masked_fill(~mask.row_has_keys(), 0.0)


def auto_backend_name(q: torch.Tensor | None) -> str:
    """The best registered backend for q's device, dtype and head size.

    NVIDIA GPU, fp16/bf16, head_dim a power of two in [16, 256], triton installed -> ``triton``
    (FlashAttention-2 prefill, Flash-Decoding with per-row lengths). Everything else -> ``sdpa``,
    PyTorch's fused kernels (on CPUs the fastest measured here for prefill; see BENCHMARKS.md).
    """
    if q is not None and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        from kvlab.attention.triton_backend import triton_available

        d = q.shape[-1]
        if triton_available() and not d & (d - 1) and 16 <= d <= 256:
            return "triton"
    return "sdpa"


def resolve_backend(name: str, q: torch.Tensor | None = None) -> Backend:
    """The backend function for ``name``; ``auto`` picks the best registered one for q."""
    if name == "auto":
        name = auto_backend_name(q)
        log.debug("attention backend auto -> %s (device %s, dtype %s, head_dim %s)", name,
                  None if q is None else q.device, None if q is None else q.dtype,
                  None if q is None else q.shape[-1])
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of "
                          f"{sorted(BACKENDS) + ['auto']}") from None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None = None,
              *, scale: float | None = None, backend: str = "sdpa") -> torch.Tensor:
    """Grouped-query attention through the named backend."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return resolve_backend(backend, q)(q, k, v, mask, scale)

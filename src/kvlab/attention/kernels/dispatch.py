"""Choosing and calling a backend: ``attention(q, k, v, mask, bias=..., backend=...)``.

Every backend has one signature: ``fn(q, k, v, mask, scale, bias) -> out`` with
``q (B, n_head, Tq, Dk)``, ``k (B, n_kv_head, Tk, Dk)``, ``v (B, n_kv_head, Tk, Dv)``, ``mask`` an
:class:`~kvlab.attention.masks.AttentionMask` or ``None`` (attend to every key; it also carries
positions and per-row lengths), ``bias`` ``None``, a tensor or a
:class:`~kvlab.attention.bias.ScoreBias`, and ``out (B, n_head, Tq, Dv)`` in q's dtype. Query head
``h`` reads KV head ``h // G`` with ``G = n_head // n_kv_head``. No backend repeats K or V per
query head: the KV-cache saving of GQA/MQA is only real if each KV head is read once for its whole
query group.

A backend registers itself (:func:`kvlab.registry.register_backend`) with a ``supports`` check;
``auto`` takes the highest-ranked backend for q's device and dtype that supports the call, and an
explicitly named backend that cannot serve a call raises :class:`ConfigError` with its reason.
"""

from __future__ import annotations

import logging

import torch

from kvlab.attention.kernels.common import check_shapes
from kvlab.attention.masks import AttentionMask
from kvlab.errors import ConfigError
from kvlab.registry import BACKENDS, Backend, backend_names

log = logging.getLogger(__name__)


def auto_backend_name(q: torch.Tensor | None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                      mask: AttentionMask | None = None, bias=None) -> str:
    """The best registered backend for this call: ``triton`` for fp16/bf16 CUDA tensors it supports,
    else ``sdpa`` (on CPUs the fastest measured here for prefill; see BENCHMARKS.md), else
    ``reference``."""
    ranked = sorted(((b.auto_rank(q), b.name) for b in BACKENDS.values() if b.auto_rank(q) is not None),
                    reverse=True)
    for _, name in ranked:
        if q is None or BACKENDS[name].supports(q, k, v, mask, bias) is None:
            return name
    raise ConfigError("no registered attention backend supports this call")


def resolve_backend(name: str, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                    v: torch.Tensor | None = None, mask: AttentionMask | None = None, bias=None) -> Backend:
    """The backend for ``name``; ``auto`` picks the best one for the call. A named backend that
    cannot serve the call raises :class:`ConfigError` saying why."""
    if name == "auto":
        name = auto_backend_name(q, k, v, mask, bias)
        log.debug("attention backend auto -> %s (device %s, dtype %s, head_dim %s)", name,
                  None if q is None else q.device, None if q is None else q.dtype,
                  None if q is None else q.shape[-1])
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {backend_names()}") from None
    if q is not None and k is not None:
        check_shapes(q, k, v)              # a malformed call is reported as such, whatever the backend
        reason = backend.supports(q, k, v, mask, bias)
        if reason is not None:
            raise ConfigError(f"attention backend {name!r} cannot serve this call: {reason}; "
                              f"use backend='auto' to pick one that can")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None = None,
              *, scale: float | None = None, backend: str = "sdpa", bias=None) -> torch.Tensor:
    """Grouped-query attention through the named backend (``scale`` defaults to ``Dk ** -0.5``)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return resolve_backend(backend, q, k, v, mask, bias).fn(q, k, v, mask, scale, bias)

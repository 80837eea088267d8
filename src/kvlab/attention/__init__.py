"""Attention: masks, backends, RoPE and the layer module."""

from kvlab.attention.backends import BACKENDS, attention, register_backend, resolve_backend
from kvlab.attention import flash as _flash  # noqa: F401  (registers the "flash" backend)
from kvlab.attention import triton_backend as _triton  # noqa: F401  (registers "triton"; imports triton lazily)
from kvlab.attention.masks import AttentionMask, may_attend, positions_from_attention_mask

__all__ = ["BACKENDS", "AttentionMask", "attention", "may_attend", "positions_from_attention_mask",
           "register_backend", "resolve_backend"]

"""Attention: the kinds (each registered once, in a file named after it), masks, score biases and
the kernels that compute attention for every kind."""

from kvlab.attention import compressed, gqa, linear, lowrank, mla  # noqa: F401  (register the built-in kinds)
from kvlab.attention.bias import ScoreBias
from kvlab.attention.context import ForwardContext
from kvlab.attention.kernels import attention, resolve_backend
from kvlab.attention.masks import AttentionMask, BlockSparse, may_attend, positions_from_attention_mask
from kvlab.registry import BACKENDS, KINDS, register_backend, register_kind

__all__ = ["BACKENDS", "KINDS", "AttentionMask", "BlockSparse", "ForwardContext", "ScoreBias", "attention",
           "may_attend", "positions_from_attention_mask", "register_backend", "register_kind", "resolve_backend"]

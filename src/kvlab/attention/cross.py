"""Cross-attention: a decoder layer's queries attend to the encoder's output (T5's ``EncDecAttention``).

With ``cross_n_kv_head`` K/V heads (MHA, GQA or MQA, as the GQA paper converted T5's decoder) and
cross-layer sharing ``cross_cla``: decoder layer ``i`` reads the source K/V that layer
``cross_cla * (i // cross_cla)`` projects — every decoder layer attends to the same encoder output,
so sharing is natural there. The K/V are projected once per source (:meth:`CrossAttention.project`,
into a :class:`~kvlab.cache.cross.CrossKV`) and read by every decoding step; queries are neither
rotated nor biased (T5 adds no position bias to cross-attention), and only source padding is masked.
"""

from __future__ import annotations

import torch
from torch import nn

from kvlab.attention.context import ForwardContext
from kvlab.attention.kernels import attention
from kvlab.attention.masks import AttentionMask
from kvlab.cache.cross import CrossKV
from kvlab.config.model import ModelConfig
from kvlab.errors import ConfigError


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention of one decoder layer (a producer owns ``k_proj``/``v_proj``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kv_source = cfg.cross_kv_sources[layer_idx]
        self.is_producer = self.kv_source == layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.cross_n_kv_head, cfg.head_dim
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        if self.is_producer:
            self.k_proj = nn.Linear(cfg.d_model, cfg.cross_n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.d_model, cfg.cross_n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.o_bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)

    def project(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The source K/V ``(B, cross_n_kv_head, S, head_dim)`` from the encoder's output ``(B, S, d)``."""
        return self._heads(self.k_proj(memory), self.n_kv_head), self._heads(self.v_proj(memory), self.n_kv_head)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        cross: CrossKV | None = ctx.cross
        if cross is None:
            raise ConfigError("cross-attention reads the encoder's output: call the encoder–decoder with a source "
                              "(model(src, tgt)) or a cache that holds one")
        B, T, _ = x.shape
        k, v = cross.kv[self.kv_source]
        q = self._heads(self.q_proj(x), self.n_head)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = attention(q, k, v, cross_mask(ctx, cross), backend=ctx.backend, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def cross_mask(ctx: ForwardContext, cross: CrossKV) -> AttentionMask | None:
    """Which source tokens each query sees (all real ones), built once per forward call."""
    if "cross_mask" not in ctx.memo:
        if cross.valid is None and ctx.q_valid is None:
            ctx.memo["cross_mask"] = None
        else:
            S = cross.n_tokens
            k_pos = torch.arange(S, device=ctx.q_pos.device).unsqueeze(0)
            ctx.memo["cross_mask"] = AttentionMask(ctx.q_pos, k_pos, q_valid=ctx.q_valid, k_valid=cross.valid,
                                                   causal=False)
    return ctx.memo["cross_mask"]

"""The attention layer: MHA/GQA/MQA by ``n_kv_head``, CLA producer or consumer by ``kv_source``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvlab.attention.backends import attention
from kvlab.attention.masks import AttentionMask
from kvlab.attention.rope import apply_rope
from kvlab.config import ModelConfig


@dataclass
class ForwardContext:
    """State shared by all layers during one forward call of the model."""

    mask: AttentionMask | None
    backend: str
    cos: torch.Tensor | None = None            # RoPE tables for the new tokens, (B|1, 1, T, D)
    sin: torch.Tensor | None = None
    cache: "object | None" = None              # kvlab.cache.KVCache
    step: "object | None" = None               # kvlab.cache.CacheStep
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # producer -> K, V
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None   # producer -> prefix K, V (no cache)


class Attention(nn.Module):
    """Self-attention whose K/V come from this layer (producer) or an earlier one (CLA consumer).

    Producers own ``k_proj``/``v_proj``; consumers own only ``q_proj``/``o_proj`` and rotate only
    their queries, because the K they read was stored after RoPE by the producer.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kv_source = cfg.kv_sources[layer_idx]
        self.is_producer = self.kv_source == layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.use_rope = cfg.pos == "rope"
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        if self.is_producer:
            self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.o_bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)        # (B, n, T, D)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_head)
        if self.use_rope:
            q = apply_rope(q, ctx.cos, ctx.sin)
        if self.is_producer:
            k = self._heads(self.k_proj(x), self.n_kv_head)
            v = self._heads(self.v_proj(x), self.n_kv_head)
            if self.use_rope:
                k = apply_rope(k, ctx.cos, ctx.sin)
            if ctx.prefix is not None:    # prefix tuning without a cache: trained keys come first
                pk, pv = ctx.prefix[self.layer_idx]
                k, v = torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)
            if ctx.cache is not None:
                k, v = ctx.cache.write(self.layer_idx, k, v, ctx.step)
            ctx.kv[self.layer_idx] = (k, v)
        else:
            k, v = ctx.kv[self.kv_source]
        if k.dtype != q.dtype:            # a cache kept in another dtype than the model
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = attention(q, k, v, ctx.mask, backend=ctx.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

"""The ``mla`` attention kind: multi-head latent attention (DeepSeek-V2/V3).

Per token a layer caches one latent ``c`` of ``kv_lora_rank`` channels and one RoPE key of
``qk_rope_head_dim`` channels shared by all heads — ``(kv_lora_rank + qk_rope_head_dim) × bytes``
per token and layer, whatever the head count. Each head expands the latent with ``kv_b_proj``
into a position-free key part (``qk_nope_head_dim``) and a value (``v_head_dim``); its query is a
position-free part plus a RoPE part.

Two ways to compute the same attention:

- **expanded** (training, prefill into an empty cache): keys and values of every head are
  materialised from the latents, and attention runs as MHA with head width nope + rope;
- **absorbed** (decoding, and any call that adds to a non-empty cache): ``W_UK`` is folded into
  the queries (``q̃_h = W_UK,hᵀ q_nope,h`` next to ``q_rope,h``) and ``W_UV`` into the output, so
  attention runs as MQA over the cache entries themselves — key = the whole entry ``[c; k_rope]``,
  value = its first ``kv_lora_rank`` channels (a view) — and each latent is read once for all heads.

CLA: a consumer layer (``kv_source``) reads its producer's latents and RoPE keys and has its own
queries, ``kv_b_proj`` and ``o_proj``. Parameter names follow transformers' ``DeepseekV3Attention``.
"""

from __future__ import annotations

import torch
from torch import nn

from kvlab.attention.context import ForwardContext
from kvlab.attention.gqa import is_producer, validate_window, window_reach, wire_layer
from kvlab.attention.kernels import attention
from kvlab.cache.latent import LatentLayer
from kvlab.config.model import ModelConfig
from kvlab.dtypes import cache_vector_bytes
from kvlab.errors import ConfigError
from kvlab.layers.norms import RMSNorm
from kvlab.layers.rope import apply_rope, rope_cos_sin, rope_inv_freq
from kvlab.registry import AttentionKind, CacheBytes, register_kind


class MLAAttention(nn.Module):
    """Multi-head latent attention with a decoupled, shared RoPE key."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        wire_layer(self, cfg, layer_idx)       # sinks are a mask rule here: the latent cache stays full
        self.n_head = cfg.n_head
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.rope_theta = cfg.rope_theta
        self.scale = (self.nope + self.rope) ** -0.5
        # None: absorbed when adding to a non-empty cache, expanded otherwise; True/False force one
        # form (the tests compare them).
        self.absorb: bool | None = None
        d, H, qk = cfg.d_model, cfg.n_head, self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * qk, bias=cfg.qkv_bias)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        if self.is_producer:
            self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=cfg.qkv_bias)
            if cfg.latent_norm:
                self.kv_a_layernorm = RMSNorm(self.rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d, bias=cfg.o_bias)

    # ------------------------------------------------------------------------------ pieces
    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, nope + rope)`` before RoPE."""
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(B, T, self.n_head, self.nope + self.rope).transpose(1, 2)

    def entries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What a token caches: ``(B, 1, T, rank + rope)`` = [latent (normalised); rotated RoPE key]."""
        B, T, _ = x.shape
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        if hasattr(self, "kv_a_layernorm"):
            c = self.kv_a_layernorm(c)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin)
        return torch.cat([c.unsqueeze(1), k_rope], dim=-1)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK (H, nope, rank)`` and ``W_UV (H, v, rank)`` from ``kv_b_proj``."""
        w = self.kv_b_proj.weight.view(self.n_head, self.nope + self.v_dim, self.rank)
        return w[:, :self.nope], w[:, self.nope:]

    def _rope_tables(self, ctx: ForwardContext, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", self.rope, self.rope_theta, dtype)
        if key not in ctx.memo:     # once per forward call, shared by the MLA layers
            inv_freq = rope_inv_freq(self.rope, self.rope_theta).to(ctx.q_pos.device)
            ctx.memo[key] = rope_cos_sin(ctx.q_pos, inv_freq, dtype)
        return ctx.memo[key]

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        if ctx.prefix is not None:
            raise ConfigError("prefix tuning places per-head keys and values, which an MLA layer does not have; "
                              "use LoRA or prompt tuning with MLA models")
        cos, sin = self._rope_tables(ctx, x.dtype)
        q = self.queries(x)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        if self.is_producer:
            entries = self.entries(x, cos, sin)
            if ctx.cache is not None:
                (entries,) = ctx.cache.update(self.layer_idx, entries, step=ctx.step)
            ctx.kv[self.layer_idx] = (entries,)
        else:
            (entries,) = ctx.kv[self.kv_source]
        if entries.dtype != q.dtype:      # a cache kept in another dtype than the model
            entries = entries.to(q.dtype)
        absorb = self.absorb
        if absorb is None:
            absorb = ctx.cache is not None and ctx.step.uniform_start != 0
        w_uk, w_uv = self.up_weights()
        mask = ctx.mask(self.window, self.sinks, sparse=self.sparse)
        if absorb:
            q_lat = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk.to(q.dtype))
            # Values are the entries' latent channels; attending with the whole entries as values and
            # keeping those channels of the output is the same product, and equal key and value widths
            # keep every backend on its fast path (PyTorch's CPU kernels: 5x slower for Dv != Dk).
            out = attention(torch.cat([q_lat, q_rope], dim=-1), entries, entries, mask,
                            scale=self.scale, backend=ctx.backend)[..., :self.rank]   # (B, H, T, rank)
            out = torch.einsum("bhtc,hvc->bhtv", out, w_uv.to(q.dtype))
        else:
            c, k_rope = entries.split([self.rank, self.rope], dim=-1)
            L = c.shape[2]
            kv = self.kv_b_proj(c.squeeze(1)).view(B, L, self.n_head, self.nope + self.v_dim).transpose(1, 2)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(-1, self.n_head, -1, -1)], dim=-1)
            out = attention(torch.cat([q_nope, q_rope], dim=-1), k, v, mask, scale=self.scale, backend=ctx.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim))


def _width(cfg: ModelConfig) -> int:
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def _cache_layer(cfg: ModelConfig, layer: int, batch_size: int, max_len: int, dtype: torch.dtype,
                 device) -> LatentLayer | None:
    if not is_producer(cfg, layer):
        return None
    return LatentLayer(batch_size, max_len, _width(cfg), dtype=dtype, device=device)


def _cache_bytes(cfg: ModelConfig, layer: int, dtype, kv_quant: str | None = None) -> CacheBytes:
    return CacheBytes(per_token=cache_vector_bytes(_width(cfg), dtype, kv_quant) if is_producer(cfg, layer) else 0)


def _param_count(cfg: ModelConfig, layer: int) -> int:
    d, H = cfg.d_model, cfg.n_head
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    bias = 1 if cfg.qkv_bias else 0
    if cfg.q_lora_rank is None:
        count = (d + bias) * H * qk
    else:
        r = cfg.q_lora_rank
        count = (d + bias) * r + r + r * H * qk
    count += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)      # kv_b_proj
    count += H * cfg.v_head_dim * d + (d if cfg.o_bias else 0)                    # o_proj
    if is_producer(cfg, layer):
        count += (d + bias) * _width(cfg) + (cfg.kv_lora_rank if cfg.latent_norm else 0)
    return count


def _fill_defaults(cfg: ModelConfig) -> None:
    """DeepSeek's shape scaled to the model: half of head_dim rotary, the rest position-free."""
    if cfg.qk_rope_head_dim is None:
        cfg.qk_rope_head_dim = max(2, (cfg.head_dim // 2) // 2 * 2)
    if cfg.qk_nope_head_dim is None:
        cfg.qk_nope_head_dim = max(0, cfg.head_dim - cfg.qk_rope_head_dim)
    if cfg.v_head_dim is None:
        cfg.v_head_dim = cfg.head_dim
    if cfg.latent_norm is None:
        cfg.latent_norm = True


def _validate(cfg: ModelConfig, layer: int, options: dict) -> None:
    validate_window(cfg, layer, options)
    if cfg.sink_positions == "cache" and cfg.layer_sinks(layer):
        raise ConfigError(f"layer {layer}: sink_positions='cache' is built for gqa layers; an mla layer keeps its "
                          f"sinks at their original positions (use sink_positions='original')")
    if cfg.kv_lora_rank is None:
        raise ConfigError(f"layer {layer} is an mla layer but kv_lora_rank is not set; give the latent width, "
                          f"e.g. kv_lora_rank={2 * cfg.head_dim}")
    for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer for mla layers")
    if not isinstance(cfg.qk_nope_head_dim, int) or cfg.qk_nope_head_dim < 0:
        raise ConfigError(f"qk_nope_head_dim={cfg.qk_nope_head_dim!r} must be a non-negative integer")
    if cfg.q_lora_rank is not None and (not isinstance(cfg.q_lora_rank, int) or cfg.q_lora_rank < 1):
        raise ConfigError(f"q_lora_rank={cfg.q_lora_rank!r} must be a positive integer or None")
    if cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim={cfg.qk_rope_head_dim} is odd; RoPE rotates pairs of dimensions")
    if cfg.pos != "rope":
        raise ConfigError(f"mla layers carry their positions in a RoPE key; pos={cfg.pos!r} must be 'rope'")


MLA = register_kind(AttentionKind(
    name="mla", module=MLAAttention, cache_layer=_cache_layer, cache_bytes=_cache_bytes,
    param_count=_param_count, options=("window", "sinks", "sparse"), validate=_validate, reach=window_reach,
    fill_defaults=_fill_defaults,
    description="multi-head latent attention (DeepSeek-V2/V3): a latent plus one shared RoPE key per token",
    examples={
        "mla": dict(attn_kind="mla", kv_lora_rank=12, qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=14),
        "mla-q-lora-no-norm": dict(attn_kind="mla", kv_lora_rank=20, q_lora_rank=24, latent_norm=False,
                                   qkv_bias=True, o_bias=True),
        "mla-cla2": dict(attn_kind="mla", kv_lora_rank=8, cla=2),
        "mla-window": dict(attn_kind="mla", kv_lora_rank=16, sliding_window=4),
        "mla-block-sparse": dict(attn_kind="mla", kv_lora_rank=16, block_sparse={"block": 2, "local": 1, "global": 1}),
    }))

"""The ``lowrank`` attention kind: a low-rank K/V cache whose keys are rotated after they are rebuilt
(Palu, Chang et al. 2025; LoRC; the "reconstruct, then RoPE" alternative to MLA's decoupled key).

Per token a producer layer caches a key latent of ``k_rank`` channels and a value latent of
``v_rank`` channels — ``(k_rank + v_rank) × bytes`` per token and layer, whatever the head count.
The widths are the kind's options ``k_rank``/``v_rank``, model-wide (``attn_options``) or per layer
(``{"kind": "lowrank", "k_rank": 40, "v_rank": 150}``): a conversion that allocates the budget
across layers gives each its own (:func:`kvlab.convert.lowrank.allocate_ranks`).
At every call its up-projections rebuild the layer's ``n_kv_head`` keys and values from the
latents of all the keys the queries see, and RoPE rotates the rebuilt keys at their own positions;
attention then runs as GQA (query head ``h`` reads KV head ``h // q_per_kv``).

Why a second latent kind beside MLA: RoPE does not commute with a low-rank projection, so MLA moves
positions into one shared RoPE key and drops the rotation of every other channel — a large change
to a trained model (SmolLM2 at half the KV: perplexity +169 % before any training). Rotating after
the rebuild keeps every channel's rotation, so a converted model starts from the plain rank-r
approximation of its own keys and values (+31 % at half the KV; :mod:`kvlab.convert.lowrank`). The
price is compute, not memory: each call rebuilds every visible key (``k_len × k_rank × n_kv_head ×
head_dim`` multiply-adds per layer), so the keys cannot be absorbed into the queries as MLA's are.
Values could be (``v_up`` folded into ``o_proj``); they are rebuilt too, which keeps one code path.
Measured on a CPU thread at MLA's bytes: decode steps 7–16× slower than MHA from 1k to 16k tokens
(BENCHMARKS.md), so this kind buys memory (batch, context), not speed, until a fused kernel
rebuilds keys inside attention as Palu's does.

CLA: a consumer layer reads its producer's rebuilt keys and values and owns only ``q_proj`` and
``o_proj``, as in the ``gqa`` kind. Windows, sinks (at their original positions) and block-sparse
layouts are mask rules here; the latent cache stays full.
"""

from __future__ import annotations

import torch
from torch import nn

from kvlab.attention.context import ForwardContext
from kvlab.attention.gqa import is_producer, validate_window, window_reach, wire_layer
from kvlab.attention.kernels import attention
from kvlab.cache.latent import LatentLayer
from kvlab.config.model import ModelConfig
from kvlab.dtypes import KVQuant, cache_vector_bytes
from kvlab.errors import ConfigError
from kvlab.layers.rope import apply_rope, rope_cos_sin
from kvlab.registry import AttentionKind, CacheBytes, Capabilities, register_kind


class LowRankAttention(nn.Module):
    """GQA whose producer caches key and value latents and rebuilds its keys and values from them."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        wire_layer(self, cfg, layer_idx)
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.k_rank, self.v_rank = layer_ranks(cfg, layer_idx)
        self.use_rope = cfg.pos == "rope"
        d, kv_out = cfg.d_model, cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        if self.is_producer:
            self.k_down = nn.Linear(d, self.k_rank, bias=cfg.qkv_bias)
            self.v_down = nn.Linear(d, self.v_rank, bias=cfg.qkv_bias)
            self.k_up = nn.Linear(self.k_rank, kv_out, bias=False)
            self.v_up = nn.Linear(self.v_rank, kv_out, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, d, bias=cfg.o_bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)        # (B, n, T, D)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """What a token caches: ``(B, 1, T, k_rank + v_rank)`` = [key latent; value latent]."""
        return torch.cat([self.k_down(x), self.v_down(x)], dim=-1).unsqueeze(1)

    def rebuild(self, latents: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated at their positions) and values ``(B, n_kv_head, L, D)`` from ``latents``."""
        c_k, c_v = latents.squeeze(1).split([self.k_rank, self.v_rank], dim=-1)
        v = self._heads(self.v_up(c_v), self.n_kv_head)
        if not self.use_rope:
            return self._heads(self.k_up(c_k), self.n_kv_head), v
        # RoPE of a rebuilt key is k·cos + rotate_half(k)·sin, and rotate_half(U c) = (P U) c for the fixed
        # signed permutation P: one matmul with [U; P U] gives both, so the rotation costs one fused
        # multiply-add over the keys instead of five passes (neg, cat, two products, a sum) — it was
        # 60 % of a decode step at 4k tokens on a CPU, since every visible key is rotated each call.
        w = self.k_up.weight.view(self.n_kv_head, self.head_dim, self.k_rank)
        half = self.head_dim // 2
        w_rot = torch.cat([-w[:, half:], w[:, :half]], dim=1)
        both = c_k @ torch.cat([w, w_rot], dim=1).view(2 * self.n_kv_head * self.head_dim, self.k_rank).T
        B, L, _ = both.shape
        k, k_rot = both.view(B, L, self.n_kv_head, 2, self.head_dim).permute(3, 0, 2, 1, 4)
        cos, sin = _key_rope_tables(ctx, k.dtype)
        return torch.addcmul(k * cos, k_rot, sin), v

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        if ctx.prefix is not None:
            raise ConfigError("prefix tuning places per-head keys and values, which a lowrank layer does not cache; "
                              "use LoRA or prompt tuning with lowrank models")
        q = self._heads(self.q_proj(x), self.n_head)
        if self.use_rope:
            q = apply_rope(q, ctx.cos, ctx.sin)
        if self.is_producer:
            latents = self.latents(x)
            if ctx.cache is not None:
                (latents,) = ctx.cache.update(self.layer_idx, latents, step=ctx.step)
            if latents.dtype != q.dtype:      # a cache kept in another dtype than the model
                latents = latents.to(q.dtype)
            k, v = self.rebuild(latents, ctx)
            ctx.kv[self.layer_idx] = (k, v)
        else:
            k, v = ctx.kv[self.kv_source]
        mask = ctx.mask(self.window, self.sinks, sparse=self.sparse)
        out = attention(q, k, v, mask, backend=ctx.backend, bias=ctx.score_bias, scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def layer_ranks(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """``(k_rank, v_rank)`` of ``layer`` (its options: the layer spec's, else the model-wide ones)."""
    options = cfg.layer_options(layer)
    return options.get("k_rank"), options.get("v_rank")


def _key_rope_tables(ctx: ForwardContext, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables at the key positions of this call (cache slots are positions), once per call."""
    if ctx.k_pos is ctx.q_pos and ctx.cos is not None and ctx.cos.dtype == dtype:
        return ctx.cos, ctx.sin
    key = ("key-rope", dtype)
    if key not in ctx.memo:
        ctx.memo[key] = rope_cos_sin(ctx.k_pos, ctx.rope_inv_freq, dtype)
    return ctx.memo[key]


def _cache_layer(cfg: ModelConfig, layer: int, batch_size: int, max_len: int, dtype: torch.dtype,
                 device) -> LatentLayer | None:
    if not is_producer(cfg, layer):
        return None
    return LatentLayer(batch_size, max_len, sum(layer_ranks(cfg, layer)), dtype=dtype, device=device)


def _cache_bytes(cfg: ModelConfig, layer: int, dtype, kv_quant: KVQuant | None = None) -> CacheBytes:
    if not is_producer(cfg, layer):
        return CacheBytes()
    return CacheBytes(per_token=cache_vector_bytes(sum(layer_ranks(cfg, layer)), dtype, kv_quant))


def _param_count(cfg: ModelConfig, layer: int) -> int:
    count = cfg.query_output_params()
    if is_producer(cfg, layer):
        ranks = sum(layer_ranks(cfg, layer))
        count += (cfg.d_model + (1 if cfg.qkv_bias else 0)) * ranks + ranks * cfg.n_kv_head * cfg.head_dim
    return count                                                         # + k/v_down, k/v_up


def _validate(cfg: ModelConfig, layer: int, options: dict) -> None:
    validate_window(cfg, layer, options)
    if cfg.sink_positions == "cache" and cfg.layer_sinks(layer):
        raise ConfigError(f"layer {layer}: sink_positions='cache' is built for gqa layers; a lowrank layer keeps its "
                          f"sinks at their original positions (use sink_positions='original')")
    if not is_producer(cfg, layer):
        return                    # a CLA consumer reads its producer's keys and values: no latent of its own
    for name, value in zip(("k_rank", "v_rank"), layer_ranks(cfg, layer)):
        if value is None:
            raise ConfigError(f"layer {layer} is a lowrank layer but {name} is not set; give the latent width, "
                              f"e.g. attn_options={{'{name}': {cfg.n_kv_head * cfg.head_dim // 2}}} (half of "
                              f"n_kv_head x head_dim)")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer for lowrank layers")


def _label(cfg: ModelConfig, layers: list[int]) -> str:
    """Low-rank Kk+Vv, or with widths that differ between layers their means: Low-rank K~k+V~v."""
    ranks = [layer_ranks(cfg, i) for i in layers if is_producer(cfg, i)]
    if len(set(ranks)) == 1:
        return f"Low-rank K{ranks[0][0]}+V{ranks[0][1]}"
    k, v = (round(sum(r[j] for r in ranks) / len(ranks)) for j in (0, 1))
    return f"Low-rank K~{k}+V~{v}"


def _describe(cfg: ModelConfig, layers: list[int]) -> str:
    ranks = [layer_ranks(cfg, i) for i in layers if is_producer(cfg, i)]
    ks, vs = [k for k, _ in ranks], [v for _, v in ranks]
    if len(set(ranks)) == 1:
        widths = f"a key latent of {ks[0]} + a value latent of {vs[0]} channels"
    else:
        widths = (f"key latents of {min(ks)}-{max(ks)} + value latents of {min(vs)}-{max(vs)} channels per layer "
                  f"(mean {sum(ks) / len(ks):.0f} + {sum(vs) / len(vs):.0f})")
    return (f"{cfg.n_head} query, {cfg.n_kv_head} KV (group {cfg.q_per_kv}), head_dim {cfg.head_dim}, "
            f"rebuilt from {widths}")


LOWRANK = register_kind(AttentionKind(
    name="lowrank", module=LowRankAttention, cache_layer=_cache_layer, cache_bytes=_cache_bytes,
    param_count=_param_count, options=("window", "sinks", "sparse", "k_rank", "v_rank"), validate=_validate,
    reach=window_reach, label=_label, describe=_describe,
    # Keys are rebuilt from a latent: no per-head K/V to prefix, no attn_scale, no encoder–decoder;
    # the cached latents are quantizable.
    capabilities=Capabilities(quantizable_cache=True),
    description="low-rank K/V cache (Palu): key and value latents per token, keys rebuilt and then rotated",
    examples={
        "lowrank": dict(attn_kind="lowrank", attn_options=dict(k_rank=6, v_rank=10)),
        "lowrank-mqa-bias": dict(attn_kind="lowrank", attn_options=dict(k_rank=5, v_rank=3), n_kv_head=1,
                                 qkv_bias=True, o_bias=True),
        "lowrank-cla2": dict(attn_kind="lowrank", attn_options=dict(k_rank=8, v_rank=8), cla=2),
        "lowrank-window": dict(attn_kind="lowrank", attn_options=dict(k_rank=8, v_rank=12), sliding_window=4),
        "lowrank-alibi": dict(attn_kind="lowrank", attn_options=dict(k_rank=8, v_rank=8), pos="alibi"),
        "lowrank-per-layer": dict(attn_kind="lowrank", n_layer=3, attention_layers=[
            {"kind": "lowrank", "k_rank": 3, "v_rank": 13}, {"kind": "lowrank", "k_rank": 9, "v_rank": 5},
            {"kind": "lowrank", "k_rank": 6, "v_rank": 10, "window": 4}]),
    }))

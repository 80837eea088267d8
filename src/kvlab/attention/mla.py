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

from dataclasses import dataclass, fields

import torch
from torch import nn

from kvlab.attention.context import ForwardContext
from kvlab.attention.gqa import is_producer, validate_window, window_reach, wire_layer
from kvlab.attention.kernels import attention, quantized_cpu
from kvlab.cache.latent import LatentLayer
from kvlab.cache.quantized import decoded
from kvlab.config.model import ModelConfig
from kvlab.dtypes import KVQuant, cache_vector_bytes
from kvlab.errors import ConfigError
from kvlab.layers.norms import RMSNorm
from kvlab.layers.rope import apply_rope, rope_cos_sin, rope_inv_freq
from kvlab.registry import AttentionKind, CacheBytes, Capabilities, register_kind


@dataclass(frozen=True)
class MLAShape:
    """An mla layer's widths, DeepSeek's names and meanings: per token a latent of ``kv_lora_rank``
    channels and one shared RoPE key of ``qk_rope_head_dim`` are cached; each head's query/key has
    ``qk_nope_head_dim + qk_rope_head_dim`` channels, its value ``v_head_dim``; ``q_lora_rank``
    (optional) factors the query projection; ``latent_norm`` RMS-normalises the latent before it is
    cached (DeepSeek does; converted models may not). They are the kind's options
    (``ModelConfig.attn_options`` or a layer spec); all but ``kv_lora_rank`` have defaults."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    latent_norm: bool = True

    @classmethod
    def of(cls, cfg: ModelConfig, layer: int = 0) -> "MLAShape":
        options = cfg.layer_options(layer)
        return cls(**{f.name: options[f.name] for f in fields(cls)})

    @property
    def width(self) -> int:
        """Channels a token caches per layer: the latent and the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def options(self) -> dict:
        """As ``attn_options``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


MLA_OPTIONS = tuple(f.name for f in fields(MLAShape))


class MLAAttention(nn.Module):
    """Multi-head latent attention with a decoupled, shared RoPE key."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        wire_layer(self, cfg, layer_idx)       # sinks are a mask rule here: the latent cache stays full
        shape = MLAShape.of(cfg, layer_idx)
        self.n_head = cfg.n_head
        self.nope, self.rope, self.v_dim = shape.qk_nope_head_dim, shape.qk_rope_head_dim, shape.v_head_dim
        self.rank = shape.kv_lora_rank
        self.rope_theta = cfg.rope_theta
        self.scale = (self.nope + self.rope) ** -0.5
        # None: absorbed when adding to a non-empty cache, expanded otherwise; True/False force one
        # form (the tests compare them).
        self.absorb: bool | None = None
        d, H, qk = cfg.d_model, cfg.n_head, self.nope + self.rope
        if shape.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * qk, bias=cfg.qkv_bias)
        else:
            self.q_a_proj = nn.Linear(d, shape.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(shape.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(shape.q_lora_rank, H * qk, bias=False)
        if self.is_producer:
            self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=cfg.qkv_bias)
            if shape.latent_norm:
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
            if ctx.cache is not None:     # a quantized cache's entries as stored: see _attend_latents
                (entries,) = ctx.cache.update(self.layer_idx, entries, step=ctx.step, stored=True)
            ctx.kv[self.layer_idx] = (entries,)
        else:
            (entries,) = ctx.kv[self.kv_source]
        absorb = self.absorb
        if absorb is None:
            absorb = ctx.cache is not None and ctx.step.uniform_start != 0
        w_uk, w_uv = self.up_weights()
        mask = ctx.mask(self.window, self.sinks, sparse=self.sparse)
        if absorb:
            q_lat = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk.to(q.dtype))
            out = self._attend_latents(torch.cat([q_lat, q_rope], dim=-1), entries, mask, ctx)
            out = torch.einsum("bhtc,hvc->bhtv", out, w_uv.to(q.dtype))
        else:
            entries = decoded(entries).to(q.dtype)
            c, k_rope = entries.split([self.rank, self.rope], dim=-1)
            L = c.shape[2]
            kv = self.kv_b_proj(c.squeeze(1)).view(B, L, self.n_head, self.nope + self.v_dim).transpose(1, 2)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(-1, self.n_head, -1, -1)], dim=-1)
            out = attention(torch.cat([q_nope, q_rope], dim=-1), k, v, mask, scale=self.scale, backend=ctx.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim))


    def _attend_latents(self, q: torch.Tensor, entries, mask, ctx: ForwardContext) -> torch.Tensor:
        """Absorbed attention over the cached entries, ``(B, H, T, rank)``. Values are the entries'
        latent channels; attending with the whole entries as values and keeping those channels of the
        output is the same product, and equal key and value widths keep every backend on its fast path
        (PyTorch's CPU kernels: 5x slower for Dv != Dk). A quantized cache's decode step reads the
        codes directly where the CPU kernel serves the call (kvlab.attention.kernels.quantized_cpu)."""
        out = quantized_cpu.attend_stored(q, entries, entries, mask, self.scale, backend=ctx.backend,
                                          bias=ctx.score_bias)
        if out is not None:
            return out[..., :self.rank]
        entries = decoded(entries).to(q.dtype)
        return attention(q, entries, entries, mask, scale=self.scale, backend=ctx.backend)[..., :self.rank]


def _cache_layer(cfg: ModelConfig, layer: int, batch_size: int, max_len: int, dtype: torch.dtype,
                 device) -> LatentLayer | None:
    if not is_producer(cfg, layer):
        return None
    return LatentLayer(batch_size, max_len, MLAShape.of(cfg, layer).width, dtype=dtype, device=device)


def _cache_bytes(cfg: ModelConfig, layer: int, dtype, kv_quant: KVQuant | None = None) -> CacheBytes:
    if not is_producer(cfg, layer):
        return CacheBytes()
    return CacheBytes(per_token=cache_vector_bytes(MLAShape.of(cfg, layer).width, dtype, kv_quant))


def _param_count(cfg: ModelConfig, layer: int) -> int:
    d, H, shape = cfg.d_model, cfg.n_head, MLAShape.of(cfg, layer)
    qk = shape.qk_nope_head_dim + shape.qk_rope_head_dim
    bias = 1 if cfg.qkv_bias else 0
    if shape.q_lora_rank is None:
        count = (d + bias) * H * qk
    else:
        r = shape.q_lora_rank
        count = (d + bias) * r + r + r * H * qk
    count += shape.kv_lora_rank * H * (shape.qk_nope_head_dim + shape.v_head_dim)      # kv_b_proj
    count += H * shape.v_head_dim * d + (d if cfg.o_bias else 0)                        # o_proj
    if is_producer(cfg, layer):
        count += (d + bias) * shape.width + (shape.kv_lora_rank if shape.latent_norm else 0)
    return count


def _option_defaults(cfg: ModelConfig, options: dict) -> dict:
    """DeepSeek's shape scaled to the model: half of head_dim rotary, the rest position-free."""
    rope = options.get("qk_rope_head_dim")
    if rope is None:
        rope = max(2, (cfg.head_dim // 2) // 2 * 2)
    nope = options.get("qk_nope_head_dim")
    return {"qk_rope_head_dim": rope,
            "qk_nope_head_dim": max(0, cfg.head_dim - rope) if nope is None else nope,
            "v_head_dim": cfg.head_dim, "q_lora_rank": None, "latent_norm": True, "kv_lora_rank": None}


def _validate(cfg: ModelConfig, layer: int, options: dict) -> None:
    validate_window(cfg, layer, options)
    if cfg.sink_positions == "cache" and cfg.layer_sinks(layer):
        raise ConfigError(f"layer {layer}: sink_positions='cache' is built for gqa layers; an mla layer keeps its "
                          f"sinks at their original positions (use sink_positions='original')")
    if options.get("kv_lora_rank") is None:
        raise ConfigError(f"layer {layer} is an mla layer but kv_lora_rank is not set; give the latent width, "
                          f"e.g. attn_options={{'kv_lora_rank': {2 * cfg.head_dim}}}")
    for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer for mla layers")
    nope, q_rank = options["qk_nope_head_dim"], options["q_lora_rank"]
    if not isinstance(nope, int) or isinstance(nope, bool) or nope < 0:
        raise ConfigError(f"qk_nope_head_dim={nope!r} must be a non-negative integer")
    if q_rank is not None and (not isinstance(q_rank, int) or isinstance(q_rank, bool) or q_rank < 1):
        raise ConfigError(f"q_lora_rank={q_rank!r} must be a positive integer or None")
    if not isinstance(options["latent_norm"], bool):
        raise ConfigError(f"latent_norm={options['latent_norm']!r} must be true or false")
    if options["qk_rope_head_dim"] % 2:
        raise ConfigError(f"qk_rope_head_dim={options['qk_rope_head_dim']} is odd; RoPE rotates pairs of dimensions")
    if cfg.pos != "rope":
        raise ConfigError(f"mla layers carry their positions in a RoPE key; pos={cfg.pos!r} must be 'rope'")


def _label(cfg: ModelConfig, layers: list[int]) -> str:
    shape = MLAShape.of(cfg, layers[0])
    return f"MLA {shape.kv_lora_rank}+{shape.qk_rope_head_dim}"


def _describe(cfg: ModelConfig, layers: list[int]) -> str:
    s = MLAShape.of(cfg, layers[0])
    return (f"{cfg.n_head} query, latent {s.kv_lora_rank} + shared RoPE key {s.qk_rope_head_dim} channels "
            f"(query/key {s.qk_nope_head_dim}+{s.qk_rope_head_dim}, value {s.v_head_dim})")


MLA = register_kind(AttentionKind(
    name="mla", module=MLAAttention, cache_layer=_cache_layer, cache_bytes=_cache_bytes,
    param_count=_param_count, options=("window", "sinks", "sparse", *MLA_OPTIONS), validate=_validate,
    option_defaults=_option_defaults, reach=window_reach, label=_label, describe=_describe,
    # Softmax attention, but over per-head keys rebuilt from a latent: no K/V prefixes to write, its
    # own score scale (nope + rope), and no encoder–decoder has one; the cached latent is quantizable.
    capabilities=Capabilities(quantizable_cache=True),
    description="multi-head latent attention (DeepSeek-V2/V3): a latent plus one shared RoPE key per token",
    examples={
        "mla": dict(attn_kind="mla", attn_options=dict(kv_lora_rank=12, qk_rope_head_dim=6, qk_nope_head_dim=10,
                                                        v_head_dim=14)),
        "mla-q-lora-no-norm": dict(attn_kind="mla", attn_options=dict(kv_lora_rank=20, q_lora_rank=24,
                                                                      latent_norm=False), qkv_bias=True, o_bias=True),
        "mla-cla2": dict(attn_kind="mla", attn_options=dict(kv_lora_rank=8), cla=2),
        "mla-window": dict(attn_kind="mla", attn_options=dict(kv_lora_rank=16), sliding_window=4),
        "mla-block-sparse": dict(attn_kind="mla", attn_options=dict(kv_lora_rank=16),
                                 block_sparse={"block": 2, "local": 1, "global": 1}),
    }))

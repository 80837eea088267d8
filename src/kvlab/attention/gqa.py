"""The ``gqa`` attention kind: MHA / GQA / MQA by ``n_kv_head``, CLA producer or consumer by
``kv_source``, optionally windowed per layer, with attention sinks.

Producers own ``k_proj``/``v_proj`` and a K/V cache layer; consumers own only ``q_proj``/``o_proj``,
cache nothing, and rotate only their queries, because the K they read was stored after RoPE by the
producer. A producer whose readers (itself and its consumers) are all windowed keeps a rolling
cache (:mod:`kvlab.cache.rolling`) of the largest of their sinks + windows, so its memory is bounded
by the window, not the context; otherwise the full cache. Options of a layer spec: ``window`` (a
sliding window for this layer, overriding the model's ``sliding_window``) and ``sinks`` (overriding
``attention_sinks``: the first positions a windowed layer always sees; ``sink_positions="cache"``
places them as StreamingLLM does, :mod:`kvlab.attention.sinks`).
"""

from __future__ import annotations

import torch
from torch import nn

from kvlab.attention.context import ForwardContext
from kvlab.attention.kernels import attention, quantized_cpu
from kvlab.attention.masks import BlockSparse
from kvlab.attention.sinks import sinks_at_cache_positions
from kvlab.cache.full import FullKVLayer
from kvlab.cache.quantized import decoded
from kvlab.cache.rolling import RollingKVLayer
from kvlab.config.model import ModelConfig, kv_bytes_per_token
from kvlab.dtypes import KVQuant, MixedKVQuant, cache_vector_bytes, field_formats
from kvlab.errors import ConfigError
from kvlab.layers.rope import apply_rope
from kvlab.registry import AttentionKind, CacheBytes, Capabilities, register_kind


class GQAAttention(nn.Module):
    """Self-attention whose K/V come from this layer (producer) or an earlier one (CLA consumer)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        wire_layer(self, cfg, layer_idx)
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.use_rope = cfg.pos == "rope"
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        self.sinks_at_cache_places = self.sinks > 0 and cfg.sink_positions == "cache"
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        if self.is_producer:
            self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.o_bias)
        # Keys stored centred and balanced against the queries (kvlab.convert.balance): the producer's
        # shift, and its scale, which every reader's queries take (a CLA consumer holds its producer's).
        self.balanced = cfg.key_balance
        if self.balanced:
            self.register_buffer("key_scale", torch.ones(cfg.n_kv_head, cfg.head_dim))
            if self.is_producer:
                self.register_buffer("key_shift", torch.zeros(cfg.n_kv_head, cfg.head_dim))

    def balances(self, ctx: ForwardContext) -> bool:
        """Whether this call attends over balanced keys: the model has them and its producer's cache
        keeps keys as integer codes (the only rounding balance helps; without a cache nothing is
        rounded, and the scores are the same either way)."""
        return self.balanced and ctx.cache is not None and ctx.cache.keys_in_codes(self.kv_source)

    def stored_keys(self, k: torch.Tensor, balance: bool) -> torch.Tensor:
        """Keys ``(B, n_kv_head, T, D)`` after RoPE as this producer stores and attends to them:
        ``(k - key_shift) / key_scale`` if ``balance``, else as they are. Each query is scaled by
        ``key_scale`` in turn (:meth:`balanced_queries`), so its scores are the original ones less
        ``q · key_shift`` — the same for every key of the query, which the softmax ignores."""
        if not balance:
            return k
        return (k - self.key_shift[:, None].to(k.dtype)) / self.key_scale[:, None].to(k.dtype)

    def balanced_queries(self, q: torch.Tensor, balance: bool) -> torch.Tensor:
        """Queries ``(B, n_head, T, D)`` after RoPE as they meet stored keys: times ``key_scale`` (of
        their KV head) if ``balance``, else as they are."""
        if not balance:
            return q
        B, _, T, D = q.shape                 # query head h reads KV head h // (n_head / n_kv_head)
        grouped = q.view(B, self.n_kv_head, self.n_head // self.n_kv_head, T, D)
        return (grouped * self.key_scale[:, None, None].to(q.dtype)).view(q.shape)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)        # (B, n, T, D)

    def input_projections(self) -> list[nn.Module]:
        """The projections of the layer's input, in the order :meth:`forward`'s ``projected`` takes
        their outputs: q, and k, v for a producer (a parallel block fuses them with the MLP's)."""
        return [self.q_proj, self.k_proj, self.v_proj] if self.is_producer else [self.q_proj]

    def forward(self, x: torch.Tensor, ctx: ForwardContext,
                projected: list[torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if projected is None:
            projected = [m(x) for m in self.input_projections()]
        q = q_unrotated = self._heads(projected[0], self.n_head)
        if self.use_rope:
            q = apply_rope(q, ctx.cos, ctx.sin)
        balance = self.balances(ctx)
        q = self.balanced_queries(q, balance)
        if self.is_producer:
            k = self._heads(projected[1], self.n_kv_head)
            v = self._heads(projected[2], self.n_kv_head)
            if self.use_rope:
                k = apply_rope(k, ctx.cos, ctx.sin)
            k = self.stored_keys(k, balance)
            if ctx.prefix is not None:    # prefix tuning without a cache: trained keys (as stored) come first
                pk, pv = ctx.prefix[self.layer_idx]
                k, v = torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)
            if ctx.cache is not None:     # a quantized cache's entries as stored: see quantized_cpu
                k, v, *keys_at = ctx.cache.update(self.layer_idx, k, v, step=ctx.step, stored=True)
                if keys_at:                # a rolling cache: its window, then the new keys
                    ctx.key_positions[self.layer_idx] = tuple(keys_at)
            ctx.kv[self.layer_idx] = (k, v)
        else:
            k, v = ctx.kv[self.kv_source]
        mask = ctx.mask(self.window, self.sinks, source=self.kv_source, sparse=self.sparse)
        out = None if self.sinks_at_cache_places else quantized_cpu.attend_stored(
            q, k, v, mask, self.scale, backend=ctx.backend, bias=ctx.score_bias)    # from a quantized cache's codes
        if out is None:
            k, v = decoded(k), decoded(v)
            if k.dtype != q.dtype:            # a cache kept in another dtype than the model
                k, v = k.to(q.dtype), v.to(q.dtype)
            if self.sinks_at_cache_places:
                q, k = sinks_at_cache_positions(q_unrotated, q, k, mask.q_pos, mask.k_pos, sinks=self.sinks,
                                                window=self.window, inv_freq=ctx.rope_inv_freq)
            out = attention(q, k, v, mask, backend=ctx.backend, bias=ctx.score_bias, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def wire_layer(module: nn.Module, cfg: ModelConfig, layer_idx: int) -> None:
    """What every softmax kind's layer knows of its place (gqa, mla, lowrank): its index, the producer
    whose K/V it reads (itself, or an earlier layer under CLA), its window, sinks and block-sparse
    layout."""
    module.layer_idx = layer_idx
    module.kv_source = cfg.kv_sources[layer_idx]
    module.is_producer = module.kv_source == layer_idx
    module.window = cfg.layer_window(layer_idx)
    module.sinks = cfg.layer_sinks(layer_idx)
    module.sparse = layer_sparse(cfg, layer_idx)


def is_producer(cfg: ModelConfig, layer: int) -> bool:
    return cfg.kv_sources[layer] == layer


def rolling_span(cfg: ModelConfig, layer: int) -> tuple[int, int] | None:
    """(sinks, window) a producer's rolling cache keeps for all its readers, or None when one of
    them sees every position (the producer then keeps the full cache)."""
    readers = [j for j, s in enumerate(cfg.kv_sources) if s == layer]
    windows = [cfg.layer_window(j) for j in readers]
    if any(w is None for w in windows):
        return None
    return max(cfg.layer_sinks(j) for j in readers), max(windows)


def _cache_layer(cfg: ModelConfig, layer: int, batch_size: int, max_len: int, dtype: torch.dtype,
                 device) -> FullKVLayer | RollingKVLayer | None:
    if not is_producer(cfg, layer):
        return None
    span = rolling_span(cfg, layer)
    if span is None or sum(span) >= max_len:      # a window as long as the cache: the full cache is the same
        return FullKVLayer(batch_size, cfg.n_kv_head, max_len, cfg.head_dim, dtype=dtype, device=device)
    sinks, window = span
    return RollingKVLayer(batch_size, cfg.n_kv_head, cfg.head_dim, window=window, sinks=sinks, dtype=dtype,
                          device=device)


def _cache_bytes(cfg: ModelConfig, layer: int, dtype, kv_quant: KVQuant | MixedKVQuant | None = None) -> CacheBytes:
    if not is_producer(cfg, layer):
        return CacheBytes()
    span = rolling_span(cfg, layer)
    if span is None:       # full K/V: quantizable (kvlab.cache.quantized), scales counted
        key, value = field_formats(kv_quant, 2) if kv_quant else (None, None)
        return CacheBytes(per_token=cfg.n_kv_head * (cache_vector_bytes(cfg.head_dim, dtype, key)
                                                     + cache_vector_bytes(cfg.head_dim, dtype, value)))
    # A rolling window stays in the cache dtype: it is bounded, and it is not quantized.
    return CacheBytes(bounded=((kv_bytes_per_token(1, cfg.n_kv_head, cfg.head_dim, dtype), sum(span)),))


def param_count(cfg: ModelConfig, layer: int) -> int:
    count = cfg.query_output_params()
    if is_producer(cfg, layer):
        count += 2 * (cfg.d_model + (1 if cfg.qkv_bias else 0)) * cfg.n_kv_head * cfg.head_dim   # k_proj, v_proj
    return count


def window_reach(cfg: ModelConfig, layer: int) -> int | None:
    """How far back a softmax layer sees: its window, or (StreamingLLM's positions) its sinks at
    their cache places; None without a window, or with sinks at their original positions."""
    window, sinks = cfg.layer_window(layer), cfg.layer_sinks(layer)
    if window is None or (sinks and cfg.sink_positions != "cache"):
        return None
    return window - 1 + sinks


def layer_sparse(cfg: ModelConfig, layer: int, options: dict | None = None) -> BlockSparse | None:
    """The layer's block-sparse layout, parsed (None: dense); ``options``: the layer's, if at hand."""
    options = cfg.layer_options(layer) if options is None else options
    own = "sparse" in options
    return BlockSparse.parse(options.get("sparse", cfg.block_sparse),
                             f"layer {layer}: sparse" if own else "block_sparse")


def validate_window(cfg: ModelConfig, layer: int, options: dict) -> None:
    """The ``window``, ``sinks`` and ``sparse`` options of a layer spec (shared by the kinds that
    take them)."""
    layer_sparse(cfg, layer, options)
    window = options.get("window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ConfigError(f"layer {layer}: window={window!r} must be a positive integer or None")
    sinks = options.get("sinks")
    if sinks is not None:
        if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
            raise ConfigError(f"layer {layer}: sinks={sinks!r} must be a non-negative integer")
        if options.get("window", cfg.sliding_window) is None:
            raise ConfigError(f"layer {layer}: sinks={sinks} without a window; attention sinks keep the first "
                              f"positions visible to a sliding window (give the layer a window too)")


def heads_label(n_kv_head: int, n_head: int) -> str:
    """MHA, GQA-g or MQA by the number of KV heads."""
    return "MHA" if n_kv_head == n_head else "MQA" if n_kv_head == 1 else f"GQA-{n_kv_head}"


GQA = register_kind(AttentionKind(
    name="gqa", module=GQAAttention, cache_layer=_cache_layer, cache_bytes=_cache_bytes,
    param_count=param_count, options=("window", "sinks", "sparse"), validate=validate_window, reach=window_reach,
    label=lambda cfg, layers: heads_label(cfg.n_kv_head, cfg.n_head),
    capabilities=Capabilities(prefix_adapters=True, softmax_scores=True, encoder_decoder=True, quantizable_cache=True,
                              separate_kv_cache=True, kv_heads=True),
    description="softmax attention with n_kv_head K/V heads (MHA/GQA/MQA) and cross-layer KV sharing (CLA)",
    examples={
        "mha": dict(n_kv_head=4),
        "gqa": dict(n_kv_head=2),
        "mqa": dict(n_kv_head=1),
        "cla2": dict(n_kv_head=2, cla=2),
        "cla3-7layers": dict(n_kv_head=2, cla=3, n_layer=7),
        "mqa-cla2": dict(n_kv_head=1, cla=2),
        "kv-source": dict(n_kv_head=2, n_layer=5, kv_source=[0, 0, 2, 0, 4]),
        "parallel": dict(n_kv_head=2, block="parallel"),
        "learned-pos": dict(n_kv_head=2, pos="learned"),
        "alibi": dict(n_kv_head=2, pos="alibi"),
        # T5's learned relative bias: 6 buckets (3 exact distances, 3 log-spaced up to 8).
        "t5-bias": dict(n_kv_head=2, pos="t5", relative_buckets=6, relative_max_distance=8),
        # T5 v1.1's block: unscaled scores, gated-GELU MLP; and the original T5's ReLU MLP.
        "t5-unscaled-geglu": dict(n_kv_head=2, pos="t5", relative_buckets=6, relative_max_distance=8,
                                  attn_scale=1.0, mlp="geglu"),
        "relu-mlp": dict(n_kv_head=1, mlp="relu"),
        "t5-bias-window-cla": dict(n_kv_head=1, cla=2, pos="t5", relative_buckets=4, relative_max_distance=6,
                                   sliding_window=5),
        "alibi-window-sinks": dict(n_kv_head=1, pos="alibi", sliding_window=4, attention_sinks=1),
        "gelu-layernorm-bias-tied": dict(n_kv_head=2, mlp="gelu", norm="layernorm", qkv_bias=True,
                                         o_bias=True, tie_embeddings=True),
        "sliding-window": dict(n_kv_head=2, sliding_window=5),
        # Longformer/BigBird-style: blocks of 2, the 2 latest blocks, block 0 global, every 3rd block back.
        "block-sparse": dict(n_kv_head=2, block_sparse={"block": 2, "local": 2, "global": 1, "stride": 3}),
        # Per layer: a sparse layer with its own layout, a windowed one, a dense one (CLA across them).
        "sparse-hybrid": dict(n_kv_head=1, cla=2, attention_layers=[
            {"kind": "gqa", "sparse": {"block": 3, "local": 1, "global": 1}}, "gqa",
            {"kind": "gqa", "sparse": {"block": 2, "local": 2, "stride": 2}, "window": 6}, "gqa"]),
        "window-sinks": dict(n_kv_head=2, sliding_window=4, attention_sinks=2),
        # StreamingLLM's positions: sinks seen at their places in the cache; CLA readers of one
        # rolling producer with their own windows and sinks.
        "streaming-sinks": dict(n_kv_head=2, n_layer=3, cla=3, sink_positions="cache", attention_layers=[
            {"kind": "gqa", "window": 4, "sinks": 2}, {"kind": "gqa", "window": 3, "sinks": 1},
            {"kind": "gqa", "window": 5, "sinks": 2}]),
        # Gemma-style: windowed layers with a rolling cache, every other layer global; CLA readers
        # with different windows and sinks share one rolling producer.
        "rolling-hybrid": dict(n_kv_head=2, n_layer=5, kv_source=[0, 0, 2, 3, 3], attention_layers=[
            {"kind": "gqa", "window": 3, "sinks": 1}, {"kind": "gqa", "window": 5}, "gqa",
            {"kind": "gqa", "window": 2, "sinks": 2}, {"kind": "gqa", "window": 4}]),
        # A hybrid: windows per layer (one global layer), with CLA pairs sharing KV across windows.
        "hybrid-windows": dict(n_kv_head=2, cla=2, attention_layers=[
            {"kind": "gqa", "window": 3}, {"kind": "gqa", "window": 6}, "gqa", {"kind": "gqa", "window": 4}]),
    }))

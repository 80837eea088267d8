"""The ``compressed`` attention kind: memory compression — a sliding window of recent tokens plus
pooled summaries of everything older (in the spirit of the Compressive Transformer and of
memory-compressed attention, here in its simplest causal form).

A layer with options ``window`` W and ``block`` C (C <= W) sees, from the query at position t:

- the raw keys and values of the last W positions (``t - W < k <= t``), as a windowed layer does;
- one summary slot per block ``b`` of C positions (``[bC, (b+1)C)``) whose first position has left
  the window (``bC + W <= t``): the mean of the block's keys and the mean of its values.

A block is summarised as soon as any of it has left the window, so nothing is ever out of sight;
while the rest of the block is still inside the window those tokens count twice (raw and in the
mean) — never a gap. The summary's slot has the position ``bC + W``, and the rule is the usual one
of :mod:`kvlab.attention.masks` with these slots exempt from the window (``AttentionMask.k_exempt``),
so every backend but Triton's kernels serves it. RoPE (or learned positions) stay as they are: a
summary key is the mean of its block's rotated keys.

The cache (:class:`~kvlab.cache.pooled.PooledKVLayer`) holds W tokens of K/V and one slot per C
tokens: the memory of a long sequence shrinks by about C (the ``pooled`` accounting term), while
nothing is forgotten outright as with a window alone.
"""

from __future__ import annotations

import torch

from kvlab.attention.context import ForwardContext
from kvlab.attention.gqa import GQAAttention, heads_label, param_count
from kvlab.attention.kernels import attention
from kvlab.attention.masks import AttentionMask
from kvlab.cache.pooled import SUM_DTYPE, PooledKVLayer, add_to_blocks
from kvlab.config.model import ModelConfig, kv_bytes_per_token
from kvlab.dtypes import dtype_bytes
from kvlab.errors import ConfigError
from kvlab.layers.rope import apply_rope
from kvlab.registry import AttentionKind, CacheBytes, Capabilities, register_kind


def _options(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    opts = cfg.layer_specs[layer].options
    return opts["window"], opts["block"]


class CompressedAttention(GQAAttention):
    """A gqa producer's projections (and its fused-projection hook for parallel blocks); its own
    keys: the window's raw ones and the older blocks' means."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.window, self.block = _options(cfg, layer_idx)

    def forward(self, x: torch.Tensor, ctx: ForwardContext,
                projected: list[torch.Tensor] | None = None) -> torch.Tensor:
        if ctx.prefix is not None:
            raise ConfigError("prefix tuning needs a full KV cache; a compressed-memory layer pools its past")
        B, T, _ = x.shape
        if projected is None:
            projected = [m(x) for m in self.input_projections()]
        q = self._heads(projected[0], self.n_head)
        k = self._heads(projected[1], self.n_kv_head)
        v = self._heads(projected[2], self.n_kv_head)
        if self.use_rope:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k_raw, v_raw, raw_pos, raw_valid, sum_k, sum_v, counts = ctx.cache.update(
                self.layer_idx, k, v, step=ctx.step)
        else:          # the whole sequence is here: its blocks' sums from this call's keys and values
            k_raw, v_raw = k, v
            raw_pos = ctx.k_pos.expand(B, -1)
            raw_valid = ctx.k_valid if ctx.k_valid is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                device=x.device)
            slots = -(-T // self.block)
            sum_k = torch.zeros(B, self.n_kv_head, slots, self.head_dim, dtype=SUM_DTYPE, device=x.device)
            sum_v = torch.zeros_like(sum_k)
            counts = torch.zeros(B, slots, dtype=torch.int32, device=x.device)
            add_to_blocks(sum_k, sum_v, counts, k, v, raw_pos, raw_valid, self.block)
        slots = counts.shape[1]
        complete = counts == self.block
        summary_pos = (torch.arange(slots, device=x.device) * self.block + self.window).expand(B, slots)
        keys = torch.cat([(sum_k / self.block).to(q.dtype), k_raw.to(q.dtype)], dim=2)
        values = torch.cat([(sum_v / self.block).to(q.dtype), v_raw.to(q.dtype)], dim=2)
        exempt = torch.cat([torch.ones_like(complete), torch.zeros_like(raw_valid, dtype=torch.bool)], dim=1)
        mask = AttentionMask(ctx.q_pos, torch.cat([summary_pos, raw_pos], dim=1), q_valid=ctx.q_valid,
                             k_valid=torch.cat([complete, raw_valid.bool()], dim=1), window=self.window,
                             k_exempt=exempt)
        out = attention(q, keys, values, mask, backend=ctx.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def _cache_layer(cfg: ModelConfig, layer: int, batch_size: int, max_len: int, dtype: torch.dtype,
                 device) -> PooledKVLayer:
    window, block = _options(cfg, layer)
    return PooledKVLayer(batch_size, cfg.n_kv_head, cfg.head_dim, window=window, block=block, max_len=max_len,
                         dtype=dtype, device=device)


def _cache_bytes(cfg: ModelConfig, layer: int, dtype) -> CacheBytes:
    window, block = _options(cfg, layer)     # its window and sums are not quantized (bounded per sequence)
    raw = kv_bytes_per_token(1, cfg.n_kv_head, cfg.head_dim, dtype)
    # One slot per block: the float32 sums of its keys and values, and an int32 count.
    slot = 2 * cfg.n_kv_head * cfg.head_dim * dtype_bytes(SUM_DTYPE) + 4
    return CacheBytes(bounded=((raw, window),), pooled=((slot, block),))


def _validate(cfg: ModelConfig, layer: int, options: dict) -> None:
    for name in ("window", "block"):
        value = options.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"layer {layer}: a compressed layer needs {name} (a positive integer), got {value!r}; "
                              f"e.g. {{\"kind\": \"compressed\", \"window\": 512, \"block\": 32}}")
    if options["block"] > options["window"]:
        raise ConfigError(f"layer {layer}: block={options['block']} exceeds window={options['window']}; a block is "
                          f"summarised once it starts leaving the window, so it must fit in it")
    if cfg.kv_sources[layer] != layer or any(s == layer for j, s in enumerate(cfg.kv_sources) if j != layer):
        raise ConfigError(f"layer {layer}: a compressed layer shares no KV across layers (CLA); give it its own")
    if cfg.pos not in ("rope", "learned"):
        raise ConfigError(f"layer {layer}: summary slots have no single position for a {cfg.pos} distance bias; "
                          f"use pos='rope' or 'learned' with compressed layers")
    if cfg.sliding_window is not None or cfg.block_sparse is not None:
        raise ConfigError(f"layer {layer}: a compressed layer has its own window; give sliding_window / "
                          f"block_sparse to the gqa layers per layer instead")


COMPRESSED = register_kind(AttentionKind(
    name="compressed", module=CompressedAttention, cache_layer=_cache_layer, cache_bytes=_cache_bytes,
    param_count=param_count, options=("window", "block"), validate=_validate,
    label=lambda cfg, layers: f"Compressed-{heads_label(cfg.n_kv_head, cfg.n_head)}",
    # Its window and block sums are bounded per sequence and stay in their own precision; fewer KV
    # heads shrink both.
    capabilities=Capabilities(kv_heads=True),
    description="memory compression: a sliding window of raw K/V plus the mean K/V of each older block",
    examples={
        "compressed": dict(n_kv_head=2, attention_layers=[{"kind": "compressed", "window": 4, "block": 2}] * 4),
        # Block as long as the window; a hybrid with full-attention layers and MQA.
        "compressed-hybrid": dict(n_kv_head=1, attention_layers=[
            {"kind": "compressed", "window": 3, "block": 3}, "gqa", {"kind": "compressed", "window": 5, "block": 2},
            "gqa"]),
    }))

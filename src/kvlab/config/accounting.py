"""Cache accounting: the one function that says what a model's cache costs.

Summed over the layers' attention kinds, each bringing its own closed form (registered with the
kind): bytes that grow with every token (full K/V, a latent) and bytes fixed per sequence (a
recurrent state, a rolling window). The planner, ``kvlab info``, the study, the cache allocator's
checks and every report call this; for the full-attention kind the answer is DESIGN's formula
``2 × n_kv_layers × n_kv_head × head_dim × bytes(dtype)``.
"""

from __future__ import annotations

import torch

from kvlab.config.model import ModelConfig
from kvlab.dtypes import dtype_bytes, parse_kv_quant
from kvlab.errors import ConfigError
from kvlab.registry import CacheBytes, get_kind


def layer_cache_bytes(cfg: ModelConfig, dtype: str | torch.dtype = "bf16",
                      kv_quant: str | None = None) -> list[CacheBytes]:
    """Per layer, what it adds to the cache (zero for layers that read another layer's cache).
    ``kv_quant`` (``'int8'``/``'int4'``): the per-token entries stored quantized, scales included."""
    kv_quant = parse_kv_quant(kv_quant)
    if not kv_quant:       # the three-argument form every kind has
        return [get_kind(spec.kind).cache_bytes(cfg, i, dtype) for i, spec in enumerate(cfg.layer_specs)]
    out = []
    for i, spec in enumerate(cfg.layer_specs):
        try:
            out.append(get_kind(spec.kind).cache_bytes(cfg, i, dtype, kv_quant=kv_quant))
        except TypeError:
            raise ConfigError(f"attention kind {spec.kind!r} does not count quantized caches (its cache_bytes "
                              f"takes no kv_quant); use kv_quant=None with it") from None
    return out


def cross_cache_bytes(cfg: ModelConfig, dtype: str | torch.dtype = "bf16") -> CacheBytes:
    """An encoder–decoder's cross-attention cache: K and V of ``cross_n_kv_head`` heads per source
    token and cross-attention producer layer (nothing for a decoder-only model)."""
    if not cfg.is_encoder_decoder:
        return CacheBytes()
    per_layer = 2 * cfg.cross_n_kv_head * cfg.head_dim * dtype_bytes(dtype)
    return CacheBytes(per_source_token=len(cfg.cross_kv_producers) * per_layer)


def cache_bytes(cfg: ModelConfig, dtype: str | torch.dtype = "bf16", kv_quant: str | None = None) -> CacheBytes:
    """The model's cache: bytes per token, per sequence and (encoder–decoders) per source token."""
    total = cross_cache_bytes(cfg, dtype)
    for b in layer_cache_bytes(cfg, dtype, kv_quant):
        total = total + b
    return total


def cache_bytes_for(cfg: ModelConfig, batch_size: int, n_tokens: int, dtype: str | torch.dtype = "bf16",
                    kv_quant: str | None = None, source_tokens: int = 0) -> int:
    """Bytes of a cache holding ``batch_size`` sequences of ``n_tokens`` tokens (and sources of
    ``source_tokens`` tokens, for an encoder–decoder)."""
    return batch_size * cache_bytes(cfg, dtype, kv_quant).for_sequence(n_tokens, source_tokens)

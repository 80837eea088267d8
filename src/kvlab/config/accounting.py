"""Cache accounting: the one function that says what a model's cache costs.

Summed over the layers' attention kinds, each bringing its own closed form (registered with the
kind): bytes that grow with every token (full K/V, a latent) and bytes fixed per sequence (a
recurrent state, a rolling window). The planner, ``kvlab info``, the study, the cache allocator's
checks and every report call this; for the full-attention kind the answer is the formula
``2 × n_kv_layers × n_kv_head × head_dim × bytes(dtype)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvlab.dtypes import KVQuant, LayeredKVQuant, MixedKVQuant, dtype_bytes, parse_kv_quant
from kvlab.errors import ConfigError
from kvlab.registry import CacheBytes, get_kind

if TYPE_CHECKING:   # annotations only: ModelConfig's own accounting methods call this module
    import torch

    from kvlab.config.model import ModelConfig


def kind_holds(kind: str, kv_quant: KVQuant | MixedKVQuant | LayeredKVQuant | None) -> bool:
    """Whether layers of attention ``kind`` can keep their cache in ``kv_quant`` as far as its formats go:
    keys and values in two formats need a kind that caches them apart (``separate_kv_cache``)."""
    if isinstance(kv_quant, LayeredKVQuant):
        return all(kind_holds(kind, f) for f in kv_quant.assigned)
    return not isinstance(kv_quant, MixedKVQuant) or get_kind(kind).capabilities.separate_kv_cache


def layer_kv_quant(cfg: ModelConfig, layer: int,
                   kv_quant: KVQuant | MixedKVQuant | LayeredKVQuant | None) -> KVQuant | MixedKVQuant | None:
    """How layer ``layer``'s cache is stored when ``kv_quant`` is asked for (a format per layer: this
    layer's): quantized if its kind declares a quantizable cache; as it is if the layer keeps nothing
    per token (a recurrent state, a consumer layer: nothing to quantize); a kind with per-token entries
    that it cannot store quantized is refused in one line."""
    if kv_quant is None:
        return None
    if isinstance(kv_quant, LayeredKVQuant):
        beyond = [i for i in kv_quant.layers if i >= cfg.n_layer]
        if beyond:
            raise ConfigError(f"KV quantization {kv_quant} names layer {beyond[0]}, but the model has {cfg.n_layer} "
                              f"layers (0-{cfg.n_layer - 1})")
        kv_quant = kv_quant.for_layer(layer)
    spec = cfg.layer_specs[layer]
    kind = get_kind(spec.kind)
    if kind.capabilities.quantizable_cache:
        if not kind_holds(spec.kind, kv_quant):
            raise ConfigError(f"layer {layer} ({spec.kind}) caches one latent per token, which is keys and values at "
                              f"once; {kv_quant} (keys/values in two formats) needs separate keys and values: use "
                              f"one format ({kv_quant.key.name} or {kv_quant.value.name})")
        return kv_quant
    if kind.cache_bytes(cfg, layer, "bf16").per_token:
        raise ConfigError(f"attention kind {spec.kind!r} does not count quantized caches (it does not declare a "
                          f"quantizable cache); use kv_quant=None with it")
    return None


def kv_quant_fits(cfg: ModelConfig, kv_quant: KVQuant | MixedKVQuant | None) -> bool:
    """Whether every layer of ``cfg`` can keep its cache in ``kv_quant``: :func:`layer_kv_quant` does not
    refuse it, and the format can store the layer's widths."""
    try:
        layer_cache_bytes(cfg, "bf16", kv_quant)     # every layer's format, and its widths (int4 pairs, rotated blocks)
    except ConfigError:
        return False
    return True


def layer_cache_bytes(cfg: ModelConfig, dtype: str | torch.dtype = "bf16",
                      kv_quant: KVQuant | None = None) -> list[CacheBytes]:
    """Per layer, what it adds to the cache (zero for layers that read another layer's cache).
    ``kv_quant``: the per-token entries stored quantized (:func:`layer_kv_quant`), scales included."""
    out = []
    for i, spec in enumerate(cfg.layer_specs):
        kind, quant = get_kind(spec.kind), layer_kv_quant(cfg, i, kv_quant)
        out.append(kind.cache_bytes(cfg, i, dtype, kv_quant=quant) if quant else kind.cache_bytes(cfg, i, dtype))
    return out


def cross_cache_bytes(cfg: ModelConfig, dtype: str | torch.dtype = "bf16") -> CacheBytes:
    """An encoder–decoder's cross-attention cache: K and V of ``cross_n_kv_head`` heads per source
    token and cross-attention producer layer (nothing for a decoder-only model)."""
    if not cfg.is_encoder_decoder:
        return CacheBytes()
    per_layer = 2 * cfg.cross_n_kv_head * cfg.head_dim * dtype_bytes(dtype)
    return CacheBytes(per_source_token=len(cfg.cross_kv_producers) * per_layer)


def cache_bytes(cfg: ModelConfig, dtype: str | torch.dtype = "bf16",
                kv_quant: str | KVQuant | None = None) -> CacheBytes:
    """The model's cache: bytes per token, per sequence and (encoder–decoders) per source token;
    ``kv_quant`` by name (``'int8'``, ``'int4'``) or as a :class:`~kvlab.dtypes.KVQuant`."""
    total = cross_cache_bytes(cfg, dtype)
    for b in layer_cache_bytes(cfg, dtype, parse_kv_quant(kv_quant)):
        total = total + b
    return total


def cache_bytes_for(cfg: ModelConfig, batch_size: int, n_tokens: int, dtype: str | torch.dtype = "bf16",
                    kv_quant: str | KVQuant | None = None, source_tokens: int = 0) -> int:
    """Bytes of a cache holding ``batch_size`` sequences of ``n_tokens`` tokens (and sources of
    ``source_tokens`` tokens, for an encoder–decoder)."""
    return batch_size * cache_bytes(cfg, dtype, kv_quant).for_sequence(n_tokens, source_tokens)

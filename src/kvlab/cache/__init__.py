"""The KV cache: a protocol of per-layer cache layers, and the model-wide cache over them."""

from kvlab.cache.base import CacheLayer, CacheStep
from kvlab.cache.cache import KVCache
from kvlab.cache.full import FullKVLayer
from kvlab.cache.latent import LatentLayer

__all__ = ["CacheLayer", "CacheStep", "FullKVLayer", "KVCache", "LatentLayer"]

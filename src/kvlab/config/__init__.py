"""Model configuration: the validated :class:`ModelConfig`, presets, and cache accounting."""

from kvlab.config.accounting import cache_bytes, cache_bytes_for, layer_cache_bytes
from kvlab.config.model import (
                                BLOCK_TYPES,
                                DEFAULT_KIND,
                                MLP_TYPES,
                                NORM_TYPES,
                                POS_TYPES,
                                LayerSpec,
                                ModelConfig,
                                default_d_ff,
                                kv_bytes_per_token,
)
from kvlab.config.presets import PRESETS
from kvlab.registry import CacheBytes

__all__ = ["BLOCK_TYPES", "DEFAULT_KIND", "MLP_TYPES", "NORM_TYPES", "POS_TYPES", "PRESETS", "CacheBytes", "LayerSpec",
           "ModelConfig", "cache_bytes", "cache_bytes_for", "default_d_ff", "kv_bytes_per_token", "layer_cache_bytes"]

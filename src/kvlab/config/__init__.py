"""Model configuration: the validated :class:`ModelConfig`, per-layer attention specs, presets,
and cache accounting."""

from kvlab.config.accounting import cache_bytes, cache_bytes_for, layer_cache_bytes
from kvlab.config.model import ModelConfig, default_d_ff, kv_bytes_per_token
from kvlab.config.presets import PRESETS
from kvlab.config.specs import DEFAULT_KIND, LayerSpec
from kvlab.config.validation import BLOCK_TYPES, MLP_TYPES, NORM_TYPES, POS_TYPES
from kvlab.registry import CacheBytes

__all__ = ["BLOCK_TYPES", "DEFAULT_KIND", "MLP_TYPES", "NORM_TYPES", "POS_TYPES", "PRESETS", "CacheBytes", "LayerSpec",
           "ModelConfig", "cache_bytes", "cache_bytes_for", "default_d_ff", "kv_bytes_per_token", "layer_cache_bytes"]

"""kvlab: transformer LMs with small, fast KV caches (MHA, GQA, MQA, Cross-Layer Attention).

Importing kvlab registers every built-in attention kind and backend (see :mod:`kvlab.registry`).
"""

from kvlab import attention as _attention  # noqa: F401  (registers the built-in kinds and backends)
from kvlab.cache import KVCache
from kvlab.config import PRESETS, LayerSpec, ModelConfig, cache_bytes, kv_bytes_per_token
from kvlab.errors import CacheOverflowError, CheckpointError, ConfigError, KvlabError
from kvlab.inference.generation import generate
from kvlab.models import ScalarHead, Transformer

__version__ = "0.1.0"

__all__ = ["PRESETS", "CacheOverflowError", "CheckpointError", "ConfigError", "KVCache", "KvlabError", "LayerSpec",
           "ModelConfig", "ScalarHead", "Transformer", "cache_bytes", "generate", "kv_bytes_per_token", "load", "save"]


def __getattr__(name):  # lazy: the checkpoint code pulls in safetensors
    if name in ("load", "save"):
        import kvlab.io

        return getattr(kvlab.io, name)
    raise AttributeError(name)

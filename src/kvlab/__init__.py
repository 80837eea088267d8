"""kvlab: transformer LMs with small, fast KV caches (MHA, GQA, MQA, Cross-Layer Attention)."""

from kvlab.cache import KVCache
from kvlab.config import PRESETS, ModelConfig, kv_bytes_per_token
from kvlab.errors import CacheOverflowError, CheckpointError, ConfigError, KvlabError
from kvlab.model import Transformer

__version__ = "0.1.0"

__all__ = ["PRESETS", "CacheOverflowError", "CheckpointError", "ConfigError", "KVCache", "KvlabError",
           "ModelConfig", "Transformer", "kv_bytes_per_token", "generate", "load"]


from kvlab.generation import generate


def __getattr__(name):  # lazy: the checkpoint code pulls in safetensors
    if name == "load":
        from kvlab.checkpoints import load
        return load
    raise AttributeError(name)

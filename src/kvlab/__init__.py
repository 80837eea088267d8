"""kvlab: transformer LMs with small, fast KV caches (MHA, GQA, MQA, Cross-Layer Attention).

Importing kvlab registers every built-in attention kind and backend (see :mod:`kvlab.registry`).
"""

import os as _os
import sys as _sys

if _sys.argv and _os.path.basename(_sys.argv[0]) == "kvlab":
    # The command line: a Ctrl-C while torch and friends are still importing (a second or two) ends
    # the command as one does later (exit 130, one line), not with a traceback or a half-imported
    # module. kvlab.cli.main() restores Python's handler once it can handle the interrupt itself.
    import signal as _signal

    def _stopped_while_starting(signum, frame):
        _sys.stderr.write("kvlab: stopped (Ctrl-C) while starting\n")
        _os._exit(130)

    _signal.signal(_signal.SIGINT, _stopped_while_starting)

from kvlab import attention as _attention  # noqa: F401  (registers the built-in kinds and backends)
from kvlab.cache import KVCache
from kvlab.config import PRESETS, LayerSpec, ModelConfig, cache_bytes, kv_bytes_per_token
from kvlab.errors import CacheOverflowError, CheckpointError, ConfigError, KvlabError
from kvlab.inference.generation import generate
from kvlab.models import EncoderDecoder, Transformer

__version__ = "0.1.0"

__all__ = ["PRESETS", "CacheOverflowError", "CheckpointError", "ConfigError", "EncoderDecoder", "KVCache", "KvlabError",
           "LayerSpec", "ModelConfig", "Transformer", "cache_bytes", "generate", "kv_bytes_per_token", "load", "save"]


def __getattr__(name):  # lazy: the checkpoint code pulls in safetensors
    if name in ("load", "save"):
        import kvlab.io

        return getattr(kvlab.io, name)
    raise AttributeError(name)

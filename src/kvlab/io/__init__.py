"""Model I/O: kvlab checkpoint directories, HF import/export, GGUF import, tokenizers, atomic
writes and provenance records. :func:`load` takes any model source; :func:`save` writes a kvlab
checkpoint."""

from kvlab.io.atomic import write_dir_atomically
from kvlab.io.kvlab_format import SCHEMA_VERSION, is_kvlab_dir, load_checkpoint, save_checkpoint
from kvlab.io.sources import BUILTIN_MODELS, builtin_model_path, load, load_config, resolve

save = save_checkpoint

__all__ = ["BUILTIN_MODELS", "SCHEMA_VERSION", "builtin_model_path", "is_kvlab_dir", "load", "load_checkpoint",
           "load_config", "resolve", "save", "save_checkpoint", "write_dir_atomically"]

"""Checkpoint formats: kvlab's own directory format (HF and GGUF import/export build on it)."""

from kvlab.checkpoints.kvlab_format import SCHEMA_VERSION, load_checkpoint, save_checkpoint

__all__ = ["SCHEMA_VERSION", "load_checkpoint", "save_checkpoint"]

"""kvlab's checkpoint directory: ``config.json``, ``model.safetensors``, tokenizer files and
``provenance.json`` (where the weights came from and every step applied since).

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place
only when complete, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvlab.config.model import ModelConfig
from kvlab.errors import CheckpointError, ConfigError
from kvlab.io.atomic import write_dir_atomically, write_json
from kvlab.io.provenance import provenance_of, stamped
from kvlab.io.tokenizer import load_tokenizer
from kvlab.io.weights import build_model, refuse_adapter
from kvlab.models.decoder import Transformer

SCHEMA_VERSION = 1
# Fields every kvlab checkpoint's config has held since schema 1 (later ones default to "absent").
REQUIRED_FIELDS = ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "max_seq_len", "pos", "mlp",
                   "tie_embeddings")
CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE = "config.json", "model.safetensors", "provenance.json"


def save_checkpoint(model: Transformer, directory: str | Path, *, tokenizer=None,
                    provenance: dict[str, Any] | None = None, extra=None,
                    state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (and its tokenizer and provenance) as a kvlab checkpoint directory.
    ``extra(tmpdir)`` may add files (e.g. a trainer state) inside the same atomic write;
    ``state_dict`` replaces ``model.state_dict()`` (e.g. one gathered from FSDP shards). An
    existing ``directory`` is replaced only under :mod:`kvlab.io.atomic`'s output policy."""
    refuse_adapter(model)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    prov = stamped(provenance if provenance is not None else provenance_of(model))
    # safetensors stores each tensor once: a tied LM head is re-tied from the config on load.
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}

    def fill(tmp: Path) -> None:
        write_json(tmp / CONFIG_FILE, {"format": "kvlab", "schema_version": SCHEMA_VERSION,
                                  "model": model.cfg.to_dict()})
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        write_json(tmp / PROVENANCE_FILE, prov)
        if extra is not None:
            extra(tmp)

    return write_dir_atomically(directory, fill, kind="kvlab-checkpoint", overwrite=overwrite)


def is_kvlab_dir(path: Path) -> bool:
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("format") == "kvlab"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a kvlab checkpoint: {CONFIG_FILE} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not a kvlab config object")
    if data.get("format") != "kvlab":
        raise CheckpointError(f"{path} is not a kvlab config (format={data.get('format')!r}); "
                              f"import foreign checkpoints with the matching importer")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"{path} has schema_version={version!r}; this kvlab reads version "
                              f"{SCHEMA_VERSION}")
    fields = data.get("model")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path} has no \"model\" object (the model's fields): the config is incomplete; "
                              f"write the checkpoint again with kvlab")
    # kvlab writes every field; a missing one would silently become a default that does not match
    # the weights (a 2048-token max_seq_len, a 256-token vocabulary).
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise CheckpointError(f"{path}: the model config lacks {', '.join(missing)}; kvlab checkpoints record "
                              f"them — add the right values or write the checkpoint again with kvlab")
    try:
        return ModelConfig.from_dict(fields)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from None


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Transformer:
    """Load a kvlab checkpoint; the model carries ``.tokenizer`` and ``.provenance``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    cfg = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}); the file is corrupt or truncated") from None
    model = build_model(cfg, state, where=str(weights), device=device, dtype=dtype)
    model.tokenizer = load_tokenizer(directory)
    prov_path = directory / PROVENANCE_FILE
    model.provenance = json.loads(prov_path.read_text()) if prov_path.is_file() else None
    return model

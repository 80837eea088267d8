"""kvlab's checkpoint directory: ``config.json``, ``model.safetensors``, tokenizer files and
``provenance.json`` (where the weights came from and every step applied since).

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place
only when complete, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvlab.config import ModelConfig
from kvlab.errors import CheckpointError, ConfigError
from kvlab.model import Transformer

SCHEMA_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE = "config.json", "model.safetensors", "provenance.json"


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_dir_atomically(target: str | Path, fill) -> Path:
    """Call ``fill(tmpdir)`` then rename tmpdir to ``target`` (replacing an existing directory)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def refuse_adapter(model) -> None:
    """A base checkpoint holds base weights only: an attached adapter is saved on its own or merged."""
    spec = getattr(model, "adapter_spec", None)
    if spec is not None:
        from kvlab.peft.adapter import MERGEABLE

        fix = "kvlab.peft.merge_and_unload(model) first" if spec.method in MERGEABLE else \
            "load the base model without it"
        raise ConfigError(f"the model has a {spec.method} adapter attached; save it with kvlab.peft.save_adapter, "
                          f"or to write a full checkpoint, {fix}")


def save_checkpoint(model: Transformer, directory: str | Path, *, tokenizer=None,
                    provenance: dict[str, Any] | None = None, extra=None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (and its tokenizer and provenance) as a kvlab checkpoint directory.
    ``extra(tmpdir)`` may add files (e.g. a trainer state) inside the same atomic write;
    ``state_dict`` replaces ``model.state_dict()`` (e.g. one gathered from FSDP shards)."""
    refuse_adapter(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    prov = provenance if provenance is not None else getattr(model, "provenance", None)
    if prov is None:
        prov = {"source": {"kind": "init", "config": model.cfg.name}, "steps": []}
    prov = {**prov, "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    # safetensors stores each tensor once: a tied LM head is re-tied from the config on load.
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}

    def fill(tmp: Path) -> None:
        _json(tmp / CONFIG_FILE, {"format": "kvlab", "schema_version": SCHEMA_VERSION,
                                  "model": model.cfg.to_dict()})
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        _json(tmp / PROVENANCE_FILE, prov)
        if extra is not None:
            extra(tmp)

    return write_dir_atomically(directory, fill)


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
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if data.get("format") != "kvlab":
        raise CheckpointError(f"{path} is not a kvlab config (format={data.get('format')!r}); "
                              f"import foreign checkpoints with the matching importer")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"{path} has schema_version={version!r}; this kvlab reads version "
                              f"{SCHEMA_VERSION}")
    try:
        return ModelConfig.from_dict(data["model"])
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from None


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], *, where: str,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """A model for ``cfg`` holding exactly the tensors of ``state``, checked name by name and shape
    by shape (a tied LM head is not expected in ``state``). Nothing half-loaded is ever returned."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v for k, v in model.state_dict().items()
                if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: the weights do not match the config: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, the config "
                                  f"implies {tuple(v.shape)}")
    model = model.to_empty(device=device)
    if dtype is not None:
        model = model.to(dtype)
    else:  # keep the stored dtype
        model = model.to(next(iter(state.values())).dtype)
    model.load_state_dict(state, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Transformer:
    """Load a kvlab checkpoint; the model carries ``.tokenizer`` and ``.provenance``."""
    from kvlab.tokenizer import load_tokenizer

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

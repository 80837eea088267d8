"""Building a model from a state dict, checked name by name and shape by shape."""

from __future__ import annotations

import torch

from kvlab.config.model import ModelConfig
from kvlab.errors import CheckpointError, ConfigError
from kvlab.models.decoder import Transformer
from kvlab.models.encoder_decoder import model_class

# Buffers of a model whose keys are stored balanced (kvlab.convert.balance): a change of coordinates
# inside attention, not weights another format holds; the model computes the same without them.
KEY_BALANCE_BUFFERS = ("key_shift", "key_scale")


def without_key_balance(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the key-balance buffers (what exporters and conversions take)."""
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in KEY_BALANCE_BUFFERS}


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], *, where: str,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """A model for ``cfg`` holding exactly the tensors of ``state``, checked name by name and shape
    by shape (a tied LM head is not expected in ``state``). Nothing half-loaded is ever returned."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
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


def refuse_adapter(model) -> None:
    """A base checkpoint holds base weights only: an attached adapter is saved on its own or merged."""
    spec = model.adapter_spec
    if spec is not None:
        fix = "kvlab.peft.merge_and_unload(model) first" if spec.mergeable else "load the base model without it"
        raise ConfigError(f"the model has a {spec.method} adapter attached; save it with kvlab.peft.save_adapter, "
                          f"or to write a full checkpoint, {fix}")

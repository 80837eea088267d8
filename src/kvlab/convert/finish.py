"""The first and last steps every converter shares: the source model's tensors to change, then a new
model from the converted config and weights, the source's tokenizer kept, and the conversion recorded
in its provenance."""

from __future__ import annotations

from kvlab.config.model import ModelConfig
from kvlab.io.provenance import record_step
from kvlab.io.weights import build_model, without_key_balance
from kvlab.models.decoder import Transformer


def source_state(model: Transformer) -> dict:
    """Copies of ``model``'s tensors for a converter to change: without a tied LM head (re-tied from
    the config) and without a key balance's vectors (kvlab.convert.balance: they belong to the old
    projections; the converted model is balanced again if its cache wants it)."""
    cfg = model.cfg
    return {k: v.detach().clone() for k, v in without_key_balance(model.state_dict()).items()
            if not (cfg.tie_embeddings and k == "lm_head.weight")}


def finish_conversion(model: Transformer, new_cfg: ModelConfig, state: dict, step: dict) -> Transformer:
    """``model`` converted: ``new_cfg`` built from ``state`` (every weight checked against the new
    shapes) on the source's device and dtype, with its tokenizer, and ``step`` (the converter's
    parameters) appended to its provenance as a ``convert`` step. Its keys are balanced exactly when
    ``state`` holds a balance's vectors (``cfg.key_balance`` follows them)."""
    balanced = len(without_key_balance(state)) < len(state)
    new = build_model(new_cfg.replace(key_balance=balanced), state, where="conversion", device=model.device,
                      dtype=model.dtype)
    new.tokenizer = model.tokenizer
    record_step(new, "convert", source=model, **step)
    return new

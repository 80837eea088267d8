"""The last step every converter shares: a new model from the converted config and weights, the
source's tokenizer kept, and the conversion recorded in its provenance."""

from __future__ import annotations

from kvlab.config.model import ModelConfig
from kvlab.io.provenance import record_step
from kvlab.io.weights import build_model, without_key_balance
from kvlab.models.decoder import Transformer


def finish_conversion(model: Transformer, new_cfg: ModelConfig, state: dict, step: dict) -> Transformer:
    """``model`` converted: ``new_cfg`` built from ``state`` (every weight checked against the new
    shapes) on the source's device and dtype, with its tokenizer, and ``step`` (the converter's
    parameters) appended to its provenance as a ``convert`` step."""
    # Balanced keys (kvlab.convert.balance) belong to the old projections: the converted model starts
    # with its keys as projected, and is balanced again if its cache wants it.
    new = build_model(new_cfg.replace(key_balance=False), without_key_balance(state), where="conversion",
                      device=model.device, dtype=model.dtype)
    new.tokenizer = model.tokenizer
    record_step(new, "convert", source=model, **step)
    return new

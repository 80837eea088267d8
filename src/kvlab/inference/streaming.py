"""Running a model with a sliding window and attention sinks at inference (StreamingLLM).

A model trained with full attention can generate or be scored with every softmax layer windowed:
its cache then keeps ``sinks + window`` entries per layer whatever the length
(:mod:`kvlab.cache.rolling`). StreamingLLM's finding is that such a window must keep the first
few tokens (the "attention sinks" trained models park attention on) and that each cached token
should be seen at its place in the cache, so that no rotary distance ever exceeds ``sinks +
window - 1`` (:mod:`kvlab.attention.sinks`) — which is what lets a model run far past the context
it was trained on.
"""

from __future__ import annotations

from kvlab.errors import ConfigError


def with_window(model, window: int, sinks: int = 0, sink_positions: str | None = None):
    """The same weights, with every softmax layer attending to the last ``window`` positions and
    the first ``sinks``; ``sink_positions`` defaults to "cache" (StreamingLLM) for RoPE models and
    "original" for the others. Returns a new model; ``model`` is unchanged."""
    from kvlab.io.weights import build_model

    cfg = model.cfg
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"window={window!r} must be a positive integer")
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ConfigError(f"sinks={sinks!r} must be a non-negative integer")
    own = [i for i, spec in enumerate(cfg.layer_specs) if {"window", "sinks"} & set(spec.options)]
    if own:
        raise ConfigError(f"layer(s) {own} of this model have windows of their own; an inference-time window "
                          f"applies to models whose layers have none")
    if getattr(model, "adapter_spec", None) is not None:
        raise ConfigError("give the window before attaching an adapter (the adapter wraps the layers it replaces)")
    if sink_positions is None:
        sink_positions = "cache" if cfg.pos == "rope" else "original"
    new_cfg = cfg.replace(sliding_window=window, attention_sinks=sinks,
                          sink_positions=sink_positions if sinks else "original")
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    new = build_model(new_cfg, state, where="with_window", device=model.device, dtype=model.dtype)
    new.tokenizer, new.provenance = model.tokenizer, model.provenance
    return new.train(model.training)

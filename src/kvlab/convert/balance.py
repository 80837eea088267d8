"""Keys stored centred and balanced against their queries, so that a quantized cache rounds less of
what attention reads — a change of coordinates that leaves the model's outputs as they were.

Why: rounding hurts keys, not values (SmolLM2-135M: int4 keys +6.4 % perplexity, int4 values +0.4 %),
because a few key channels carry a large offset that is nearly the same for every token (RoPE's slow
pairs) or a range much wider than the rest, and a group's 16 levels are spread over it. KIVI answers
with per-channel groups along the tokens, which a per-token cache, a paged pool and llama.cpp's
layouts do not have. This answers inside the per-token layout, with two exact identities:

- **Centring.** Subtracting one vector ``μ`` from every cached key lowers each of a query's scores by
  the same ``q · μ``, which the softmax ignores (a mask's ``-inf`` and ALiBi's distances stay as they
  were). ``μ`` is the keys' mean over calibration text, after RoPE (where they are cached).
- **Balancing.** ``q · k = (q ⊙ s) · (k / s)`` for any positive per-channel ``s``: keys are stored
  divided by ``s`` and every query of the layer (and of a CLA consumer reading it) is multiplied by
  it. ``s = (σ_k / rms_q)^α`` per channel (SmoothQuant's migration, with the keys' spread and the
  queries' size; α = :data:`BALANCE_STRENGTH`) moves levels from channels the queries barely read to
  those they read; normalised to a geometric mean of 1 per head.

Measured on SmolLM2-135M, first in a simulation (8,192 validation tokens, every attention call's keys
rounded to int4 in groups of 32 per token; float 11.473): as projected 12.212 (+6.4 %), centred
11.715 (+2.1 %), centred and rotated (Hadamard) 11.697 (+2.0 %), centred, balanced (α = 0.5) and
rotated 11.621 (+1.3 %); scaling by the keys' spread alone (s = σ_k) made it worse (12.051). Then
through the cache itself (``int4-h``, keys and values, 16,384 validation tokens, float 12.007, the
vectors fitted on 8,192 train tokens): as projected 12.607 (+5.0 %); balanced with α = 0, 0.125,
0.25, 0.375, 0.5: 12.273, 12.299, 12.210, 12.321, 12.387 — α = 0.25 (+1.7 %) best, and every one
well below the keys as projected. The calibration sample moves these by a few hundredths.

The vectors are buffers of each ``gqa`` layer (``key_shift`` on producers, ``key_scale`` on every
layer), saved with the checkpoint; ``cfg.key_balance`` says they are there. Other runtimes store the
keys as projected: exporters leave the buffers out (the exported model computes the same), and a
structural conversion drops them (its new projections need their own; balance again afterwards).
"""

from __future__ import annotations

import torch

from kvlab.config.model import ModelConfig
from kvlab.convert.finish import finish_conversion, source_state
from kvlab.errors import ConfigError
from kvlab.models.modes import eval_mode

__all__ = ["BALANCE_STRENGTH", "BALANCE_WINDOW", "balance_keys", "balanceable_layers", "key_statistics"]

# How far the per-channel scale moves the keys toward the queries' size (α of the module docstring).
BALANCE_STRENGTH = 0.25

# Calibration windows of this many tokens (or the model's context, if shorter). The keys' mean after
# RoPE depends on the positions seen, and the result on the sample: on SmolLM2 (int4-h, 8,192 tokens of
# the train split, 8,192 validation tokens, float 11.473) 512-token windows gave 11.77-11.78, 1,024
# 11.72-11.76 (32,768 tokens no better), 2,048 11.84 (α = 0.5) — every one far below the keys as
# projected (12.02).
BALANCE_WINDOW = 1024


def balanceable_layers(cfg: ModelConfig) -> list[int]:
    """The ``gqa`` layers, whose keys can be stored balanced (other kinds cache latents or states)."""
    return [i for i, spec in enumerate(cfg.layer_specs) if spec.kind == "gqa"]


def key_statistics(model, batches) -> dict[int, dict[str, torch.Tensor]]:
    """Per balanceable producer: its keys' mean and variance after RoPE, and the mean square of the
    queries that read each KV head (its own query heads of that group and its CLA consumers'), each
    ``(n_kv_head, head_dim)`` float64, over ``batches`` of token rows ``(B, T)``. They are read where the
    layers balance them (``stored_keys``/``balanced_queries``, with the keys and queries as projected
    and rotated), so fused projections, biases and positions are the model's own."""
    cfg = model.cfg
    layers = balanceable_layers(cfg)
    producers = [i for i in layers if cfg.kv_sources[i] == i]
    if not producers:
        raise ConfigError(f"key balance stores the keys of gqa layers; this model has none (kinds: "
                          f"{', '.join(sorted(set(cfg.kinds)))})")
    H, D = cfg.n_kv_head, cfg.head_dim
    sums = {p: {"n": 0, "k": 0.0, "kk": 0.0, "q": 0.0, "nq": 0} for p in producers}

    def watch_keys(attn, s):
        def stored_keys(k, balance):
            k64 = k.detach().double()
            s["n"] += k.shape[0] * k.shape[2]
            s["k"] = s["k"] + k64.sum((0, 2))
            s["kk"] = s["kk"] + (k64 * k64).sum((0, 2))
            return type(attn).stored_keys(attn, k, balance)
        return stored_keys

    def watch_queries(attn, s):
        def balanced_queries(q, balance):
            B, _, T, _ = q.shape
            q64 = q.detach().double().view(B, H, -1, T, D)        # the query heads of each KV head
            s["q"] = s["q"] + (q64 * q64).sum((0, 2, 3))
            s["nq"] += B * q64.shape[2] * T
            return type(attn).balanced_queries(attn, q, balance)
        return balanced_queries

    watched = []
    for i in layers:
        attn = model.layers[i].self_attn
        s = sums[cfg.kv_sources[i]]
        attn.balanced_queries = watch_queries(attn, s)          # instance attributes, removed after
        watched.append(attn)
        if i in sums:
            attn.stored_keys = watch_keys(attn, s)
    try:
        with eval_mode(model), torch.no_grad():
            for tokens in batches:
                model(tokens.to(model.device))
    finally:
        for attn in watched:
            for name in ("stored_keys", "balanced_queries"):
                attn.__dict__.pop(name, None)
    if not all(s["n"] and s["nq"] for s in sums.values()):
        raise ConfigError("key balance needs at least one batch of calibration tokens")
    out = {}
    for p, s in sums.items():
        mean = s["k"] / s["n"]
        out[p] = {"mean": mean.cpu(), "var": (s["kk"] / s["n"] - mean * mean).clamp(min=0).cpu(),
                  "query_power": (s["q"] / s["nq"]).cpu()}
    return out


def balance_vectors(stats: dict[int, dict[str, torch.Tensor]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per producer ``(shift, scale)``: the keys' mean, and ``(σ_k / rms_q)^BALANCE_STRENGTH`` per
    channel with a geometric mean of 1 per head (module docstring). A channel no query reads, or whose keys never
    vary, keeps a scale set by a floor at a millionth of its head's largest value, not zero or infinity."""
    out = {}
    for p, s in stats.items():
        spread = s["var"].sqrt()
        size = s["query_power"].sqrt()
        spread = spread.clamp(min=1e-6 * float(spread.max().clamp(min=1e-30)))
        size = size.clamp(min=1e-6 * float(size.max().clamp(min=1e-30)))
        scale = (spread / size) ** BALANCE_STRENGTH
        scale = scale / scale.log().mean(-1, keepdim=True).exp()
        out[p] = (s["mean"], scale)
    return out


def balance_keys(model, batches):
    """``model`` with its ``gqa`` layers' keys stored centred and balanced (a new model; the module
    docstring), fitted on ``batches`` of calibration token rows starting at position 0. Its outputs
    equal the original's up to float rounding; only a quantized cache sees the difference."""
    cfg = model.cfg
    if cfg.is_encoder_decoder:
        raise ConfigError("key balance fits decoder-only self-attention on token batches; an encoder–decoder has none")
    if getattr(model, "prompt_adapter", None) is not None:
        raise ConfigError("the model has a prompt adapter, whose prefixes are keys as projected; merge or remove it "
                          "before balancing the keys")
    if cfg.sink_positions == "cache" and any(cfg.layer_sinks(i) for i in range(cfg.n_layer)):
        raise ConfigError("key balance stores keys centred and scaled, and this model re-rotates its sinks' keys at "
                          "their cache places (sink_positions='cache'): balance a model with "
                          "sink_positions='original'")
    vectors = balance_vectors(key_statistics(model, batches))
    state = source_state(model)
    dtype = next(iter(state.values())).dtype
    for i in balanceable_layers(cfg):
        shift, scale = vectors[cfg.kv_sources[i]]
        pre = f"layers.{i}.self_attn"
        state[f"{pre}.key_scale"] = scale.to(dtype)
        if cfg.kv_sources[i] == i:
            state[f"{pre}.key_shift"] = shift.to(dtype)
    return finish_conversion(model, cfg, state, {"method": "key-balance",
                                                 "calibration_tokens": sum(int(b.numel()) for b in batches)})


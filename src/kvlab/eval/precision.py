"""A cache precision per layer, allocated by each layer's estimated effect on the loss.

Layers do not feel rounding alike: on SmolLM2-135M int4 keys cost +6.4 % perplexity in all layers
together and int4 values +0.4 %, and within each a few layers carry most of it. Given a budget in
bytes per token, the best mix keeps the layers that feel rounding most in a wider format and
spends fewer bits where it does not show — llama.cpp and vLLM store one type for every layer, so
this is kvlab's own (``--kv-quant BASE+FORMAT@LAYERS``, :class:`kvlab.dtypes.LayeredKVQuant`).

**The estimate.** Rounding a cached vector adds an error ``δ`` to it; to second order the loss
grows by ``½ δᵀ F δ`` with ``F = E[g gᵀ]`` the loss gradient's second moment with respect to that
vector (the Fisher metric :func:`kvlab.convert.lowrank.kv_loss_moments` measures, which the low-rank
and MLA fits use too). :func:`rounding_costs` rounds each layer's calibration keys (after RoPE, as the
cache stores them; the error rotated back to where ``F`` is measured) and values in each format with
the cache's own quantizer and averages ``½ δᵀ F δ`` over the tokens: one number per layer, field and
format, in nats per token. Its scale is off — the gradient's second moment is not the loss's
curvature: on SmolLM2 it put int4 keys at 0.118 nats (measured: 0.055) and int4 values at 0.056
(measured: 0.004) — but its order among layers holds. So :func:`calibrated_costs` measures two
caches through the model (the narrowest format for every key with the widest for every value, and the
other way round) and scales the key and the value estimates to match them; then the summed estimate
predicted 0.0007 / 0.0094 / 0.037 nats for allocations measured at 0.0010 / 0.0122 / 0.032
(``benchmarks/kv_precision_by_layer.py``). Errors of different layers add (cross terms are left out).

**The allocation.** :func:`allocate_precisions` picks one key format and one value format per layer
minimising the summed estimate within the budget — exactly, by dynamic programming over the
reachable byte totals (only the cheapest way to each total survives, and only totals that lower the
cost are kept), which a test checks against brute force.
"""

from __future__ import annotations

from itertools import product

import torch

from kvlab.cache.quantized import decode, encode
from kvlab.config.accounting import kv_quant_fits, layer_cache_bytes
from kvlab.config.model import ModelConfig
from kvlab.dtypes import KV_QUANTS, KVQuant, LayeredKVQuant, MixedKVQuant, layered_kv_quant
from kvlab.errors import ConfigError
from kvlab.eval.perplexity import batch_loss
from kvlab.layers.rope import apply_rope, rope_cos_sin
from kvlab.models.modes import eval_mode
from kvlab.registry import get_kind

# The formats a layer's keys or values may take, each a format the CPU kernel reads directly, the
# narrowest last (int4 rotated: the same bytes as int4, less error; BENCHMARKS "Rotated formats").
LAYER_FORMATS = ("fp8", "int8", "int4-h")


def layer_formats(cfg: ModelConfig) -> tuple[str, ...]:
    """:data:`LAYER_FORMATS` that ``cfg``'s caches can hold: a rotated format turns blocks of 32 channels,
    so heads narrower than that take its plain twin."""
    return tuple(name if kv_quant_fits(cfg, KV_QUANTS[name]) else KV_QUANTS[name].codes_name
                 for name in LAYER_FORMATS)
# The least a calibrated scale may be (the raw estimate overstated int4 values' cost 15x on SmolLM2).
MIN_SCALE = 0.01


def _producers(cfg: ModelConfig) -> list[int]:
    """The layers that cache keys and values apart; every other layer kind is refused in one line."""
    kinds = sorted({cfg.layer_specs[i].kind for i in cfg.kv_producers
                    if not get_kind(cfg.layer_specs[i].kind).capabilities.separate_kv_cache})
    if kinds:
        raise ConfigError(f"a precision per layer splits each layer's keys from its values; layers of kind(s) {kinds} "
                          f"cache one latent for both: give them one format (--kv-quant int8)")
    return list(cfg.kv_producers)


def rounding_costs(model, batches, loss_moments: dict, formats=None) -> dict[int, dict[str, dict[str, float]]]:
    """``{layer: {"k"|"v": {format: estimated loss increase, nats per token}}}`` of rounding that
    layer's cached keys or values alone (module docstring). ``loss_moments``:
    :func:`~kvlab.convert.lowrank.kv_loss_moments` of the same model; ``batches``: token rows
    ``(B, T)`` that start at position 0 (the calibration batches)."""
    cfg = model.cfg
    layers = _producers(cfg)
    fmts = {name: KV_QUANTS[name] for name in formats or layer_formats(cfg)}
    sums = {i: {f: dict.fromkeys(fmts, 0.0) for f in ("k", "v")} for i in layers}
    count = 0
    H, D = cfg.n_kv_head, cfg.head_dim
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key):
        def on_output(module, args, out):
            captured[key] = out.detach()
        return on_output

    metric = {(i, f): loss_moments[(i, f)].to(model.device, torch.float64) for i in layers for f in ("k", "v")}
    hooks = []
    for i in layers:
        attn = model.layers[i].self_attn
        hooks += [attn.k_proj.register_forward_hook(keep((i, "k"))), attn.v_proj.register_forward_hook(keep((i, "v")))]
    try:
        with eval_mode(model), torch.no_grad():
            for tokens in batches:
                tokens = tokens.to(model.device)[:, :-1]
                B, T = tokens.shape
                captured.clear()
                model(tokens)
                positions = torch.arange(T, device=model.device).expand(B, T)
                cos, sin = rope_cos_sin(positions, model.rope_inv_freq(model.device), torch.float32)
                for i in layers:
                    attn = model.layers[i].self_attn
                    for field in ("k", "v"):
                        x = captured[(i, field)].float().view(B, T, H, D).transpose(1, 2)    # (B, H, T, D)
                        rotated = field == "k" and cfg.pos == "rope"
                        stored = apply_rope(x, cos, sin) if rotated else x
                        # balanced keys (kvlab.convert.balance) are rounded as stored in integer codes,
                        # the error scaled back after; fp8 stores them as projected
                        balanced = field == "k" and getattr(attn, "balanced", False)
                        F = metric[(i, field)]
                        for name, fmt in fmts.items():
                            codes = balanced and not fmt.is_float
                            kept = attn.stored_keys(stored, True) if codes else stored
                            err = decode(*encode(kept, fmt), fmt, torch.float32) - kept
                            if codes:
                                err = err * attn.key_scale[:, None].float()
                            if rotated:                   # back to the unrotated channels F is measured in
                                err = apply_rope(err, cos, -sin)
                            e = err.transpose(1, 2).reshape(B * T, H * D).double()
                            sums[i][field][name] += 0.5 * float(((e @ F) * e).sum())
                count += B * T
    finally:
        for h in hooks:
            h.remove()
    if not count:
        raise ConfigError("the precision allocation needs at least one batch of calibration tokens")
    return {i: {f: {n: v / count for n, v in c.items()} for f, c in fields.items()} for i, fields in sums.items()}


def calibrated_costs(model, batches, costs: dict, formats=None) -> tuple[dict, dict[str, float]]:
    """``costs`` with the key and the value estimates scaled to match two caches measured through the
    model on ``batches`` (module docstring), and the two scales ``{"k": …, "v": …}``."""
    formats = formats or layer_formats(model.cfg)
    narrow, wide = formats[-1], "int8" if "int8" in formats else formats[0]
    if narrow == wide:
        return costs, {"k": 1.0, "v": 1.0}
    total = {f: {name: sum(c[f][name] for c in costs.values()) for name in (narrow, wide)} for f in ("k", "v")}
    float_loss = batch_loss(model, batches)
    keys_narrow = batch_loss(model, batches, f"{narrow}/{wide}") - float_loss
    values_narrow = batch_loss(model, batches, f"{wide}/{narrow}") - float_loss
    # keys_narrow = sk·K(narrow) + sv·V(wide); values_narrow = sk·K(wide) + sv·V(narrow)
    a = torch.tensor([[total["k"][narrow], total["v"][wide]], [total["k"][wide], total["v"][narrow]]],
                     dtype=torch.float64)
    sk, sv = torch.linalg.solve(a, torch.tensor([keys_narrow, values_narrow], dtype=torch.float64)).tolist()
    # Measurement noise (few calibration tokens) can push a small scale to zero or below: keep it at a
    # floor, so that rounding still costs something and spare bytes still go where the estimate says.
    scales = {"k": max(sk, MIN_SCALE), "v": max(sv, MIN_SCALE)}
    return {i: {f: {n: v * scales[f] for n, v in c.items()} for f, c in fields.items()}
            for i, fields in costs.items()}, scales


def allocate_by_loss(model, batches, loss_moments: dict, budget: int, formats=None):
    """The precision per layer of ``model``'s cache that fits ``budget`` bytes per token with the least
    estimated loss increase (calibrated on ``batches``), and that estimate in nats per token."""
    formats = formats or layer_formats(model.cfg)
    costs, _ = calibrated_costs(model, batches, rounding_costs(model, batches, loss_moments, formats), formats)
    return allocate_precisions(model.cfg, costs, budget, formats)


def layer_options(cfg: ModelConfig, layer: int, formats=None) -> list[tuple[KVQuant | MixedKVQuant, int]]:
    """Every (keys, values) pair of ``formats`` for ``layer`` with its bytes per token."""
    kind = get_kind(cfg.layer_specs[layer].kind)
    out = []
    formats = formats or layer_formats(cfg)
    for k, v in product(formats, formats):
        fmt = KV_QUANTS[k] if k == v else MixedKVQuant(KV_QUANTS[k], KV_QUANTS[v])
        out.append((fmt, kind.cache_bytes(cfg, layer, "bf16", kv_quant=fmt).per_token))
    return out


def allocate_precisions(cfg: ModelConfig, costs: dict[int, dict[str, dict[str, float]]], budget: int,
                        formats=None) -> tuple[KVQuant | MixedKVQuant | LayeredKVQuant, float]:
    """The format per layer (a single format where every layer gets the same) with the least summed
    estimated loss increase whose cache fits ``budget`` bytes per token, and that estimate; a
    :class:`ConfigError` when not even the narrowest format fits."""
    layers = _producers(cfg)
    formats = formats or layer_formats(cfg)
    fixed = sum(b.per_token for i, b in enumerate(layer_cache_bytes(cfg, "bf16")) if i not in layers)
    # reachable byte total -> (least estimated cost, the formats chosen so far)
    frontier: dict[int, tuple[float, tuple]] = {fixed: (0.0, ())}
    for i in layers:
        options = [(fmt, b, costs[i]["k"][fmt.formats[0].name] + costs[i]["v"][fmt.formats[-1].name])
                   for fmt, b in layer_options(cfg, i, formats)]
        grown: dict[int, tuple[float, tuple]] = {}
        for total, (cost, chosen) in frontier.items():
            for fmt, b, c in options:
                t = total + b
                if t <= budget and (t not in grown or cost + c < grown[t][0]):
                    grown[t] = (cost + c, chosen + (fmt,))
        frontier, best = {}, float("inf")
        for t in sorted(grown):                  # a larger total is kept only where it costs less
            if grown[t][0] < best:
                frontier[t], best = grown[t], grown[t][0]
        if not frontier:
            narrowest = min(b for _, b, _ in options)
            raise ConfigError(f"no precision per layer fits {budget:,} bytes per token: layer {i} alone needs "
                              f"{narrowest:,} in its narrowest format ({formats[-1]})")
    cost, chosen = min(frontier.values(), key=lambda x: x[0])
    per_layer = dict(zip(layers, chosen))
    common = max(set(chosen), key=lambda f: (chosen.count(f), f.name))     # for layers that cache nothing
    return layered_kv_quant([per_layer.get(i, common) for i in range(cfg.n_layer)]), cost

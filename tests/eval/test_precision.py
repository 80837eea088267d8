"""A cache precision per layer allocated by the loss (kvlab.eval.precision): the allocation against
brute force, the rounding estimate against a float64 computation with explicit rotation matrices, the
calibration against the caches it measures, and shrink's "by-layer" candidate."""

import itertools

import numpy as np
import pytest
import torch

from kvlab import ConfigError, ModelConfig
from kvlab.cache.quantized import decode, encode
from kvlab.config.accounting import layer_kv_quant
from kvlab.convert.balance import balance_keys
from kvlab.convert.lowrank import kv_loss_moments
from kvlab.dtypes import KV_QUANTS
from kvlab.eval.perplexity import batch_loss
from kvlab.eval.precision import (
    allocate_precisions,
    calibrated_costs,
    layer_formats,
    layer_options,
    rounding_costs,
)
from kvlab.recipes.shrink.candidates import BY_LAYER, enumerate_candidates, resolve_candidates

from conftest import make_model
from naive import rope_matrices


def _costs(n_layer: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n_layer):
        out[i] = {}
        for f in ("k", "v"):     # wider formats cost less, as rounding does
            fp8, int8, int4 = sorted(torch.rand(3, generator=g).tolist())
            out[i][f] = {"int8": int8 / 100, "fp8": fp8, "int4": int4 * 10}
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_allocation_is_the_best_within_the_budget_by_brute_force(seed):
    cfg = ModelConfig.from_preset("tiny", n_layer=3)
    costs = _costs(3, seed)
    options = [layer_options(cfg, i) for i in range(3)]
    for budget in sorted({sum(o[1] for o in combo) for combo in itertools.product(*options)})[::7]:
        kv_quant, estimate = allocate_precisions(cfg, costs, budget)
        best = min((sum(costs[i]["k"][f.formats[0].name] + costs[i]["v"][f.formats[-1].name]
                        for i, (f, _) in enumerate(combo)), combo)
                   for combo in itertools.product(*options) if sum(b for _, b in combo) <= budget)
        assert estimate == pytest.approx(best[0], rel=1e-12)
        assert cfg.kv_bytes_per_token("bf16", kv_quant) <= budget
        got = sum(costs[i]["k"][layer_kv_quant(cfg, i, kv_quant).formats[0].name]
                  + costs[i]["v"][layer_kv_quant(cfg, i, kv_quant).formats[-1].name] for i in range(3))
        assert got == pytest.approx(best[0], rel=1e-12)
    narrowest = cfg.kv_bytes_per_token("bf16", "int4")
    with pytest.raises(ConfigError, match="no precision per layer fits"):
        allocate_precisions(cfg, costs, narrowest - 1)


@torch.no_grad()
@pytest.mark.parametrize("balanced", [False, True])
def test_the_rounding_estimate_equals_a_float64_computation(balanced):
    """½ E[δᵀ F δ] with δ the cache's rounding error of the keys after RoPE, taken back through the
    inverse rotation (explicit matrices here), and of the values; F of the model's own loss. Keys
    stored balanced (kvlab.convert.balance) are rounded as stored: (Rk − μ) / s, the error times s."""
    model = make_model(n_kv_head=2, d_model=128, n_head=2, n_layer=2)        # head_dim 64
    batches = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))]
    if balanced:
        model = balance_keys(model, batches).eval()
    F = kv_loss_moments(model, batches)
    got = rounding_costs(model, batches, F)
    captured = {}
    hooks = [getattr(model.layers[i].self_attn, f"{f}_proj").register_forward_hook(
        lambda m, a, out, key=(i, f): captured.__setitem__(key, out)) for i in range(2) for f in "kv"]
    model(batches[0][:, :-1])
    for h in hooks:
        h.remove()
    R = rope_matrices(np.arange(16), 64, model.cfg.rope_theta)
    for (i, f), x in captured.items():
        x = x.view(2, 16, 2, 64).double().numpy()                           # (B, T, H, D)
        rotated = np.einsum("tij,bthj->bthi", R, x) if f == "k" else x
        for name in layer_formats(model.cfg):             # fp8, int8, int4-h (rotated before rounding)
            fmt = KV_QUANTS[name]
            stored, scale = rotated, None
            if balanced and f == "k" and not fmt.is_float:  # integer codes hold balanced keys
                attn = model.layers[i].self_attn
                shift, scale = attn.key_shift.double().numpy(), attn.key_scale.double().numpy()    # (H, D)
                stored = (rotated - shift) / scale
            s = torch.from_numpy(stored).float().transpose(1, 2)           # (B, H, T, D), as the cache keeps it
            err = (decode(*encode(s, fmt), fmt, torch.float32) - s).transpose(1, 2).double().numpy()
            if scale is not None:
                err = err * scale                                          # back to the keys as projected
            if f == "k":
                err = np.einsum("tji,bthj->bthi", R, err)                  # Rᵀ: back before the rotation
            e = err.reshape(32, 128)
            want = 0.5 * np.einsum("ni,ij,nj->", e, F[(i, f)].numpy(), e) / 32
            assert got[i][f][name] == pytest.approx(want, rel=1e-4), (i, f, name)
    assert layer_formats(model.cfg)[-1] == "int4-h"
    assert all(got[i][f]["int4-h"] > got[i][f]["int8"] for i in got for f in "kv")
    assert layer_formats(ModelConfig.from_preset("tiny"))[-1] == "int4"     # 16-channel heads: no rotated blocks


@torch.no_grad()
def test_the_calibration_matches_the_two_caches_it_measures():
    model = make_model(n_kv_head=2, d_model=128, n_head=2, n_layer=2)
    batches = [torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(2))]
    raw = rounding_costs(model, batches, kv_loss_moments(model, batches))
    scaled, scales = calibrated_costs(model, batches, raw)
    plain = batch_loss(model, batches)
    for kf, vf in (("int4-h", "int8"), ("int8", "int4-h")):
        measured = batch_loss(model, batches, f"{kf}/{vf}") - plain
        estimate = sum(c["k"][kf] + c["v"][vf] for c in scaled.values())
        if min(scales.values()) > 0.01:                                    # no scale held at its floor
            assert estimate == pytest.approx(measured, rel=1e-6, abs=1e-9)
    for i in raw:
        for f in "kv":
            assert scaled[i][f]["int4-h"] == pytest.approx(raw[i][f]["int4-h"] * scales[f])


def test_shrink_offers_a_precision_per_layer_and_allocates_it(small):
    import kvlab
    from kvlab.data.windows import calibration_batches
    from kvlab.recipes.shrink.candidates import moments_for

    cfg = ModelConfig.from_preset("smollm2-135m")
    at2 = [c for c in enumerate_candidates(cfg, 11520) if c.precision == BY_LAYER]
    assert [c.name for c in at2] == ["by-layer cache"] and at2[0].kv_bytes == 11520
    assert not [c for c in enumerate_candidates(cfg, 5760) if c.precision == BY_LAYER]   # int4 alone is 7,200
    base = kvlab.load(small)
    budget = base.cfg.kv_bytes_per_token("bf16", "int8/int4") + 40                      # room for a layer or two
    cands = [c for c in enumerate_candidates(base.cfg, budget) if not c.restructured]
    calibration = calibration_batches(base.tokenizer, 1024, seq_len=64, seed=0)
    resolved = resolve_candidates(base, cands, calibration, lambda: moments_for(base, cands, calibration),
                                  log=lambda s: None)
    [layered] = [c for c in resolved if c.name.startswith("by-layer cache")]   # spare bytes: not a uniform one
    assert layered.kv_bytes == base.cfg.kv_bytes_per_token("bf16", layered.kv_quant) <= budget
    assert base.cfg.kv_bytes_per_token("bf16", layered.kv_quant) > budget - 40             # the spare bytes spent
    assert "keys" in layered.name and "+" in layered.precision
    assert len(resolved) == len(cands) and BY_LAYER not in {c.precision for c in resolved}

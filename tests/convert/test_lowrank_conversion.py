"""Conversion of GQA/MHA models to low-rank K/V latents (the ``lowrank`` kind, Palu): exact at full
rank, each latent the optimal rank-r fit of the calibration keys/values (checked against a float64
NumPy eigendecomposition and the closed-form residual), any widths, CLA and windows kept, and on a
trained model a better start than MLA and mean-pooled MQA at the same cache bytes."""

import numpy as np
import pytest
import torch

from kvlab import ConfigError, cache_bytes
from kvlab.convert import convert, convert_to_lowrank, convert_to_mla
from kvlab.convert.calibrated import attention_input_moments
from kvlab.training import evaluate_loss

from conftest import make_model

TOKENS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
CALIB = [torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("variant", [dict(n_kv_head=2), dict(n_kv_head=4, qkv_bias=True, cla=2),
                                     dict(n_kv_head=2, pos="alibi"),
                                     dict(n_kv_head=2, attention_layers=["gqa", {"kind": "gqa", "window": 5}] * 2)])
def test_full_rank_converts_exactly_and_decodes_from_the_latents(variant):
    model = make_model(**variant)
    full = model.cfg.n_kv_head * model.cfg.head_dim
    low = convert_to_lowrank(model, k_rank=full, v_rank=full, calibration=CALIB)
    assert [s.kind for s in low.cfg.layer_specs] == ["lowrank"] * 4
    assert [s.options for s in low.cfg.layer_specs] == [s.options for s in model.cfg.layer_specs]
    assert low.cfg.kv_sources == model.cfg.kv_sources
    torch.testing.assert_close(low(TOKENS), model(TOKENS), rtol=1e-4, atol=1e-4)
    cache = low.new_cache(2, 20)
    steps = [low(TOKENS[:, :9], cache=cache)] + [low(TOKENS[:, t:t + 1], cache=cache) for t in range(9, 17)]
    torch.testing.assert_close(torch.cat(steps, 1), model(TOKENS), rtol=1e-4, atol=1e-4)


def _layer_inputs(model, batches):
    """The augmented attention inputs [x, 1] of every layer, float64 NumPy (an independent capture)."""
    seen = {i: [] for i in range(model.cfg.n_layer)}
    hooks = [b.self_attn.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().double()))
             for i, b in enumerate(model.layers)]
    with torch.no_grad():
        for t in batches:
            model(t)
    for h in hooks:
        h.remove()
    out = {}
    for i, xs in seen.items():
        x = torch.cat([x.flatten(0, 1) for x in xs]).numpy()
        out[i] = np.concatenate([x, np.ones((len(x), 1))], 1)
    return out


def test_each_latent_is_the_optimal_rank_r_fit_of_the_calibration_keys_and_values():
    """The rebuilt keys/values span the top principal directions of the calibration keys/values, and
    their squared error equals the sum of the dropped eigenvalues (Eckart–Young), per layer."""
    model = make_model(n_kv_head=2, qkv_bias=True)
    k_rank, v_rank = 5, 11
    low = convert_to_lowrank(model, k_rank=k_rank, v_rank=v_rank, calibration=CALIB)
    X = _layer_inputs(model, CALIB)
    sd, lsd = model.state_dict(), low.state_dict()
    for i in range(model.cfg.n_layer):
        for leaf, rank in (("k", k_rank), ("v", v_rank)):
            w = np.concatenate([sd[f"layers.{i}.self_attn.{leaf}_proj.weight"].double().numpy(),
                                sd[f"layers.{i}.self_attn.{leaf}_proj.bias"].double().numpy()[:, None]], 1)
            Y = X[i] @ w.T                                          # the original keys / values
            vals, vecs = np.linalg.eigh(Y.T @ Y / len(Y))
            top = vecs[:, -rank:]
            down = np.concatenate([lsd[f"layers.{i}.self_attn.{leaf}_down.weight"].double().numpy(),
                                   lsd[f"layers.{i}.self_attn.{leaf}_down.bias"].double().numpy()[:, None]], 1)
            up = lsd[f"layers.{i}.self_attn.{leaf}_up.weight"].double().numpy()
            rebuilt = X[i] @ down.T @ up.T
            # same subspace as NumPy's top eigenvectors
            np.testing.assert_allclose(up @ up.T, top @ top.T, atol=1e-4)
            err = ((Y - rebuilt) ** 2).sum(1).mean()
            np.testing.assert_allclose(err, vals[:-rank].sum(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("k_rank, v_rank", [(1, 1), (3, 29), (17, 6)])
def test_any_widths_give_their_cache_bytes(k_rank, v_rank):
    model = make_model(n_kv_head=2)
    low = convert_to_lowrank(model, k_rank=k_rank, v_rank=v_rank, calibration=CALIB)
    assert cache_bytes(low.cfg, torch.bfloat16).per_token == model.cfg.n_layer * (k_rank + v_rank) * 2
    assert low.cfg.param_counts() == low.param_counts()
    assert torch.isfinite(low(TOKENS)).all()
    step = low.provenance["steps"][-1]
    assert (step["to"], step["k_rank"], step["v_rank"]) == ("lowrank", k_rank, v_rank)


@pytest.mark.parametrize("kw, match", [
    (dict(k_rank=0, v_rank=8), r"k_rank=0 must be in \[1, 32\]"),
    (dict(k_rank=8, v_rank=33), r"v_rank=33 must be in \[1, 32\]"),
    (dict(k_rank=8, v_rank=True), r"v_rank=True must be in"),
])
def test_impossible_widths_name_the_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        convert_to_lowrank(make_model(n_kv_head=2), calibration=CALIB, **kw)


def test_non_gqa_models_and_missing_calibration_are_refused():
    with pytest.raises(ConfigError, match="starts from 'gqa' layers"):
        convert_to_lowrank(make_model(attn_kind="mla", kv_lora_rank=8), k_rank=4, v_rank=4, calibration=CALIB)
    with pytest.raises(ConfigError, match="calibration"):
        convert_to_lowrank(make_model(n_kv_head=2), k_rank=4, v_rank=4)


def test_lowrank_beats_mla_and_mean_pooled_mqa_at_equal_bytes_on_a_trained_model(trained_mha):
    """At α = 0 on a trained MHA model, at MQA's cache size: low-rank latents (keys rotated after the
    rebuild) stay much closer to the model than MLA (whose latent channels lose their rotation) and
    mean-pooled MQA; wider latents are closer still."""
    model, val, calib = trained_mha
    loss = {"original": evaluate_loss(model, val, 4, "cpu")}
    mqa = convert(model, n_kv_head=1, method="mean")
    loss["mqa-mean"] = evaluate_loss(mqa, val, 4, "cpu")
    mla = convert_to_mla(model, kv_lora_rank=24, qk_rope_head_dim=8, calibration=calib)
    loss["mla"] = evaluate_loss(mla, val, 4, "cpu")
    low = convert_to_lowrank(model, k_rank=12, v_rank=20, calibration=calib)
    assert low.cfg.kv_bytes_per_token() == mqa.cfg.kv_bytes_per_token() == mla.cfg.kv_bytes_per_token()
    loss["lowrank"] = evaluate_loss(low, val, 4, "cpu")
    gap = {k: v - loss["original"] for k, v in loss.items()}
    assert gap["lowrank"] < 0.5 * gap["mla"] and gap["lowrank"] < 0.2 * gap["mqa-mean"], loss
    wider = convert_to_lowrank(model, k_rank=24, v_rank=40, calibration=calib)
    assert evaluate_loss(wider, val, 4, "cpu") < loss["lowrank"], loss


def test_moments_computed_once_give_the_same_conversion():
    model = make_model(n_kv_head=2)
    moments = attention_input_moments(model, CALIB)
    a = convert_to_lowrank(model, k_rank=6, v_rank=9, calibration=CALIB)
    b = convert_to_lowrank(model, k_rank=6, v_rank=9, moments=moments)
    torch.testing.assert_close(a(TOKENS), b(TOKENS))

"""Conversion of GQA/MHA models to MLA: exact where an exact conversion exists, any latent width,
better than mean-pooled MQA on a trained model, and loadable by transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvlab import ConfigError, cache_bytes
from kvlab.convert import convert, convert_to_mla
from kvlab.io.hf import export_hf
from kvlab.training import evaluate_loss

from conftest import make_model

TOKENS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
CALIB = [torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("variant", [dict(n_kv_head=1), dict(n_kv_head=1, qkv_bias=True)])
def test_mqa_with_all_frequencies_and_a_full_latent_converts_exactly(variant):
    """One KV head, every RoPE pair kept (R = D) and a latent as wide as the values: nothing is lost,
    so the MLA model computes the same logits (queries absorb the rope factors, kv_b_proj the PCA)."""
    model = make_model(**variant)
    D = model.cfg.head_dim
    mla = convert_to_mla(model, kv_lora_rank=D, qk_rope_head_dim=D, calibration=CALIB)
    torch.testing.assert_close(mla(TOKENS), model(TOKENS), rtol=1e-4, atol=1e-4)
    # and decoding with the latent cache (absorbed) too
    cache = mla.new_cache(2, 20)
    steps = [mla(TOKENS[:, :9], cache=cache)] + [mla(TOKENS[:, t:t + 1], cache=cache) for t in range(9, 17)]
    torch.testing.assert_close(torch.cat(steps, 1), model(TOKENS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 7, 13, 30])
def test_any_latent_width_gives_its_cache_bytes(rank):
    model = make_model(n_kv_head=2)
    mla = convert_to_mla(model, kv_lora_rank=rank, qk_rope_head_dim=4, calibration=CALIB)
    assert cache_bytes(mla.cfg, torch.bfloat16).per_token == model.cfg.n_layer * (rank + 4) * 2
    options = mla.cfg.layer_options(0)
    assert (options["kv_lora_rank"], options["qk_nope_head_dim"], options["v_head_dim"]) == (rank, 12, 16)
    assert torch.isfinite(mla(TOKENS)).all()


@pytest.mark.parametrize("kw, match", [
    (dict(kv_lora_rank=8, qk_rope_head_dim=5), "qk_rope_head_dim=5 must be an even number"),
    (dict(kv_lora_rank=500, qk_rope_head_dim=8), r"kv_lora_rank=500 must be in \[1, 48\]"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=18), "must be an even number of channels in"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=8, method="calibrated"), "not one of"),
])
def test_impossible_mla_conversions_name_the_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        convert_to_mla(make_model(n_kv_head=2), calibration=CALIB, **kw)


def test_cla_and_learned_positions_are_refused():
    with pytest.raises(ConfigError, match="cross-layer"):
        convert_to_mla(make_model(n_kv_head=2, cla=2), kv_lora_rank=8, calibration=CALIB)
    with pytest.raises(ConfigError, match="pos='rope'"):
        convert_to_mla(make_model(n_kv_head=2, pos="learned"), kv_lora_rank=8, calibration=CALIB)
    with pytest.raises(ConfigError, match="calibration"):
        convert_to_mla(make_model(n_kv_head=2), kv_lora_rank=8)


def test_mla_beats_mean_pooled_mqa_and_improves_with_the_latent_width_on_a_trained_model(trained_mha):
    """At α = 0 on a trained MHA model: MLA at MQA's cache size is closer to the model than mean-pooled
    MQA (and recovers most of its loss), with either latent fit; a wider latent is closer still."""
    model, val, calib = trained_mha
    loss = {"original": evaluate_loss(model, val, 4, "cpu")}
    mqa = convert(model, n_kv_head=1, method="mean")
    loss["mqa-mean"] = evaluate_loss(mqa, val, 4, "cpu")
    for method in ("pca", "whitened"):
        mla = convert_to_mla(model, kv_lora_rank=24, qk_rope_head_dim=8, method=method, calibration=calib)
        assert mla.cfg.kv_bytes_per_token() == mqa.cfg.kv_bytes_per_token()
        loss[method] = evaluate_loss(mla, val, 4, "cpu")
        assert loss[method] - loss["original"] < 0.5 * (loss["mqa-mean"] - loss["original"]), loss
    wider = convert_to_mla(model, kv_lora_rank=48, qk_rope_head_dim=8, calibration=calib)
    narrower = convert_to_mla(model, kv_lora_rank=8, qk_rope_head_dim=8, calibration=calib)
    assert evaluate_loss(narrower, val, 4, "cpu") > loss["pca"] > evaluate_loss(wider, val, 4, "cpu"), loss


def test_a_converted_model_with_latent_norm_exports_to_deepseek_v3(trained_mha, tmp_path):
    model, _, calib = trained_mha
    mla = convert_to_mla(model, kv_lora_rank=24, qk_rope_head_dim=8, latent_norm=True, calibration=calib)
    export_hf(mla, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, mla(TOKENS), rtol=1e-4, atol=5e-4)


def _random_pd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n + 3, generator=g, dtype=torch.float64)
    return a @ a.T / n + torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 5)


def test_the_fisher_latent_is_the_best_fit_in_the_losss_metric_and_pca_in_its_own():
    """The latent of each method is optimal in the metric it claims: rebuild the position-free keys and
    the values from the converted layer's own kv_a/kv_b weights and measure the expected error
    tr(M E S Eᵀ) in the loss's metric (F of keys and values, damped as the fit damps it, float64) and
    in PCA's (keys scaled to the values' energy): each method wins in its own."""
    from kvlab.convert.calibrated import _augmented
    from kvlab.convert.lowrank import _metric_roots
    from kvlab.convert.mla import _pair_rows, mla_layer_state, plan_mla

    model = make_model(n_kv_head=2, d_model=64, n_head=4)          # head_dim 16, 2 KV heads
    cfg = model.cfg
    D, R, rank = cfg.head_dim, 4, 10
    new_cfg = plan_mla(cfg, kv_lora_rank=rank, qk_rope_head_dim=R)
    S = _random_pd(cfg.d_model + 1, 0)
    F = {"k": _random_pd(2 * D, 1), "v": _random_pd(2 * D, 2)}
    nope = _pair_rows(range(R // 2, D // 2), D)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wk, wv = _augmented(base, "layers.0.self_attn.k_proj"), _augmented(base, "layers.0.self_attn.v_proj")
    raw = torch.cat([torch.cat([wk[g * D:(g + 1) * D][nope], wv[g * D:(g + 1) * D]]) for g in range(2)])
    width, nk = len(nope) + D, len(nope)
    key_rows = [g * width + r for g in range(2) for r in range(nk)]
    value_rows = [g * width + nk + c for g in range(2) for c in range(D)]
    M = torch.zeros(len(raw), len(raw), dtype=torch.float64)
    channels = [g * D + r for g in range(2) for r in nope]
    M[torch.tensor(key_rows)[:, None], torch.tensor(key_rows)] = F["k"][torch.tensor(channels)[:, None],
                                                                         torch.tensor(channels)]
    M[torch.tensor(value_rows)[:, None], torch.tensor(value_rows)] = F["v"]
    root = _metric_roots(M)[0]
    loss_metric = root @ root.T
    k_energy = torch.einsum("ij,jk,ik->", raw[key_rows], S, raw[key_rows])
    v_energy = torch.einsum("ij,jk,ik->", raw[value_rows], S, raw[value_rows])
    scale = torch.ones(len(raw), dtype=torch.float64)
    scale[key_rows] = (v_energy / k_energy).sqrt()
    pca_metric = torch.diag(scale ** 2)

    errors = {}
    for method in ("pca", "fisher"):
        state = {k: v.clone().double() for k, v in base.items()}
        mla_layer_state(state, cfg, new_cfg, 0, S, method, F)
        latent = _augmented(state, "layers.0.self_attn.kv_a_proj_with_mqa")[:rank]
        up = state["layers.0.self_attn.kv_b_proj.weight"]
        per_head = up.shape[0] // cfg.n_head
        rebuilt = torch.cat([up[h * per_head:(h + 1) * per_head] for h in (0, 2)]) @ latent   # KV heads 0, 1
        E = raw - rebuilt
        errors[method] = {name: torch.trace(m @ E @ S @ E.T).item()
                          for name, m in (("loss", loss_metric), ("pca", pca_metric))}
        if method == "fisher":   # the latent in the RoPE key's units, so that fp8 and int groups round it well
            kv_a = _augmented(state, "layers.0.self_attn.kv_a_proj_with_mqa")
            rms = [(torch.einsum("ij,jk,ik->", w, S, w) / len(w)).sqrt() for w in (kv_a[:rank], kv_a[rank:])]
            torch.testing.assert_close(rms[0], rms[1], rtol=1e-9, atol=0)
    assert errors["fisher"]["loss"] < 0.99 * errors["pca"]["loss"]
    assert errors["pca"]["pca"] < 0.99 * errors["fisher"]["pca"]

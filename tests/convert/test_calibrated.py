"""Calibrated merging of KV heads: exact where an exact merge exists (closed forms), and a better
starting point than mean pooling on a trained model."""

import numpy as np
import pytest
import torch

from kvlab import ConfigError
from kvlab.convert.heads import convert
from kvlab.data.corpus import builtin_corpus
from kvlab.data.windows import calibration_batches
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.training import evaluate_loss

from conftest import make_model

TOKENS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
CALIB = [torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _rotate_pairs(rows: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Key rows ``(D, d)`` of a head whose keys are ``c_j · κ_j`` per RoPE pair (complex ``c``)."""
    half = rows.shape[0] // 2
    a, b = rows[:half], rows[half:]
    re, im = c.real.unsqueeze(1).float(), c.imag.unsqueeze(1).float()
    return torch.cat([re * a - im * b, im * a + re * b])


@pytest.mark.parametrize("variant, change", [
    (dict(n_kv_head=2, qkv_bias=True), dict(n_kv_head=2)),
    (dict(n_kv_head=2, cla=2), dict(cla=2)),                   # the same wiring: two readers, one signal
    (dict(n_kv_head=2, n_layer=5, kv_source=[0, 0, 2, 0, 4]), dict(kv_source=[0, 0, 2, 0, 4])),
])
def test_merging_nothing_reproduces_the_model(variant, change):
    model = make_model(**variant)
    same = convert(model, method="calibrated", calibration=CALIB, **change)
    assert same.cfg.kv_sources == model.cfg.kv_sources
    torch.testing.assert_close(same(TOKENS), model(TOKENS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", [dict(n_kv_head=4), dict(n_kv_head=4, cla=2), dict(n_kv_head=4, qkv_bias=True)])
def test_heads_that_differ_by_a_rope_commuting_map_merge_exactly(variant):
    """Head 1's keys are head 0's rotated and scaled within every frequency pair, and its values a
    linear map of head 0's: one shared head carries both exactly (the queries and o_proj absorb the
    maps), so the calibrated GQA-2 equals the MHA model; mean pooling does not."""
    model = make_model(**variant)
    D = model.cfg.head_dim
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i in model.cfg.kv_producers:
            attn = model.layers[i].self_attn
            for src, dst in ((0, 1), (2, 3)):
                c = torch.complex(torch.randn(D // 2, generator=g), torch.randn(D // 2, generator=g))
                mix = torch.randn(D, D, generator=g) / D ** 0.5 + torch.eye(D)
                attn.k_proj.weight[dst * D:(dst + 1) * D] = _rotate_pairs(attn.k_proj.weight[src * D:(src + 1) * D], c)
                attn.v_proj.weight[dst * D:(dst + 1) * D] = mix @ attn.v_proj.weight[src * D:(src + 1) * D]
                if attn.k_proj.bias is not None:
                    kb = attn.k_proj.bias[src * D:(src + 1) * D].unsqueeze(1)
                    attn.k_proj.bias[dst * D:(dst + 1) * D] = _rotate_pairs(kb, c).squeeze(1)
                    attn.v_proj.bias[dst * D:(dst + 1) * D] = mix @ attn.v_proj.bias[src * D:(src + 1) * D]
    ref = model(TOKENS)
    calibrated = convert(model, n_kv_head=2, method="calibrated", calibration=CALIB)
    torch.testing.assert_close(calibrated(TOKENS), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(convert(model, n_kv_head=2, method="mean")(TOKENS), ref, atol=1e-2)
    assert calibrated.cfg.n_kv_head == 2 and calibrated.cfg.kv_bytes_per_token() == model.cfg.kv_bytes_per_token() // 2


def test_calibrated_beats_mean_pooling_at_alpha_zero_on_a_trained_model(trained_mha):
    model, val, calib = trained_mha
    losses = {"original": evaluate_loss(model, val, 4, "cpu")}
    changes = {"gqa-2": dict(n_kv_head=2), "mqa": dict(n_kv_head=1), "cla2": dict(cla=2),
               "mqa-cla2": dict(n_kv_head=1, cla=2)}
    for name, change in changes.items():
        for method in ("mean", "calibrated"):
            converted = convert(model, method=method, calibration=calib, **change)
            losses[method, name] = evaluate_loss(converted, val, 4, "cpu")
    for name in changes:
        assert losses["calibrated", name] < losses["mean", name], losses
        # it recovers most of what mean pooling loses
        gap_mean = losses["mean", name] - losses["original"]
        assert losses["calibrated", name] - losses["original"] < 0.5 * gap_mean, losses


def test_calibration_comes_from_the_training_split_only():
    tok = ByteTokenizer()
    batches = calibration_batches(tok, 1000, seq_len=100, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 100), (4, 100), (2, 100)]
    val_text = "".join(d.text for d in builtin_corpus("validation"))
    row = bytes(batches[0][0].clamp(max=255).tolist()).decode("utf-8", errors="ignore")
    assert row[20:60] not in val_text
    assert np.isin(batches[0].numpy(), np.arange(tok.vocab_size)).all()


def test_calibrated_needs_calibration():
    model = make_model(n_kv_head=4)
    with pytest.raises(ConfigError, match="needs calibration token batches"):
        convert(model, n_kv_head=2, method="calibrated")


@pytest.mark.parametrize("pos", ["learned", "t5"])
def test_without_rope_heads_that_differ_by_any_linear_map_merge_exactly(pos):
    """Without RoPE a key has no rotation to commute with: head 1's keys are any invertible map of
    head 0's (and its values another), and one shared head still carries both exactly."""
    model = make_model(n_kv_head=4, pos=pos, qkv_bias=True)
    D = model.cfg.head_dim
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i in model.cfg.kv_producers:
            attn = model.layers[i].self_attn
            for src, dst in ((0, 1), (2, 3)):
                for proj in (attn.k_proj, attn.v_proj):
                    mix = torch.randn(D, D, generator=g) / D ** 0.5 + torch.eye(D)
                    proj.weight[dst * D:(dst + 1) * D] = mix @ proj.weight[src * D:(src + 1) * D]
                    proj.bias[dst * D:(dst + 1) * D] = mix @ proj.bias[src * D:(src + 1) * D]
    ref = model(TOKENS)
    calibrated = convert(model, n_kv_head=2, method="calibrated", calibration=CALIB)
    torch.testing.assert_close(calibrated(TOKENS), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(convert(model, n_kv_head=2, method="mean")(TOKENS), ref, atol=1e-2)

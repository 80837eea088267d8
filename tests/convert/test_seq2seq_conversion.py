"""GQA/MQA and cross-layer conversion of an encoder–decoder's decoder (the GQA paper on T5): the
decoder's self- and cross-attention pooled by mean, the encoder untouched, shapes and accounting."""

from __future__ import annotations

import pytest
import torch

from kvlab import EncoderDecoder, ModelConfig, Transformer
from kvlab.convert.heads import convert
from kvlab.errors import ConfigError


def mha() -> EncoderDecoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=4, n_head=4, n_encoder_layer=2, pos="t5", relative_buckets=8,
                      relative_max_distance=16, attn_scale=1.0, mlp="geglu")
    return EncoderDecoder(cfg).eval()


def test_nothing_pooled_is_the_same_model():
    model = mha()
    same = convert(model, n_kv_head=4, cross_n_kv_head=4)
    src, tgt = torch.randint(0, 40, (2, 7)), torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        assert torch.equal(same(src, tgt), model(src, tgt))


def test_mean_pooling_closed_form():
    """Self-attention to 2 heads; cross-attention to MQA shared by layer pairs: each new projection
    is the mean of the heads (and then layers) it replaces; the encoder and queries are copied."""
    model = mha()
    new = convert(model, n_kv_head=2, cross_n_kv_head=1, cross_cla=2)
    cfg = new.cfg
    assert (cfg.n_kv_head, cfg.cross_n_kv_head, cfg.cross_kv_sources) == (2, 1, [0, 0, 2, 2])
    old, got = model.state_dict(), new.state_dict()
    D = cfg.head_dim
    for i in range(4):
        w = old[f"layers.{i}.self_attn.k_proj.weight"].view(4, D, 32)
        assert torch.allclose(got[f"layers.{i}.self_attn.k_proj.weight"].view(2, D, 32),
                              torch.stack([w[:2].mean(0), w[2:].mean(0)]), atol=1e-7)
    for p in (0, 2):
        v = torch.stack([old[f"layers.{i}.cross_attn.v_proj.weight"].view(4, D, 32).mean(0) for i in (p, p + 1)])
        assert torch.allclose(got[f"layers.{p}.cross_attn.v_proj.weight"], v.mean(0), atol=1e-7)
        assert f"layers.{p + 1}.cross_attn.v_proj.weight" not in got
    for name, t in old.items():
        if name.startswith("encoder.") or "q_proj" in name or "o_proj" in name or "mlp" in name:
            assert torch.equal(got[name], t), name
    steps = new.provenance["steps"][-1]
    assert steps["cross_n_kv_head"] == [4, 1]
    assert steps["cross_bytes_per_source_token_bf16"] == [2 * 4 * 4 * D * 2, 2 * 2 * 1 * D * 2]


def test_accounting_follows_the_conversion():
    model = mha()
    before = model.cfg.cache_bytes("bf16")
    after = convert(model, n_kv_head=1, cla=2, cross_n_kv_head=2, cross_cla=4).cfg.cache_bytes("bf16")
    assert after.per_token * 8 == before.per_token          # MQA (÷4) and CLA2 (÷2)
    assert after.per_source_token * 8 == before.per_source_token   # 2 of 4 heads, one producer of 4


def test_refused_conversions():
    model = mha()
    with pytest.raises(ConfigError, match="cannot pool cross_n_kv_head=4 into 3"):
        convert(model, cross_n_kv_head=3)
    with pytest.raises(ConfigError, match="calibrated merging of an encoder–decoder"):
        convert(model, n_kv_head=2, method="calibrated")
    with pytest.raises(ConfigError, match="decoder-only"):
        convert(Transformer(ModelConfig()), cross_n_kv_head=1)
    with pytest.raises(ConfigError, match="cross_cla=3 does not group"):
        convert(convert(model, cross_cla=2), cross_cla=3)

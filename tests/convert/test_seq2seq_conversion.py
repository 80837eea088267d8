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
    with pytest.raises(ConfigError, match="decoder-only"):
        convert(Transformer(ModelConfig()), cross_n_kv_head=1)
    with pytest.raises(ConfigError, match="cross_cla=3 does not group"):
        convert(convert(model, cross_cla=2), cross_cla=3)


def _calibration():
    from kvlab.data.seq2seq import Seq2SeqBatches, task_pairs
    from kvlab.io.tokenizer import ByteTokenizer

    return Seq2SeqBatches(task_pairs(48, seed=5), ByteTokenizer(), 0, 16).all_batches()


def _byte_model(seed: int = 0, **extra) -> EncoderDecoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=260, d_model=32, n_layer=4, n_head=4, n_encoder_layer=2, pos="t5",
                                relative_buckets=8, relative_max_distance=16, qkv_bias=True,
                                decoder_start_token_id=0), **extra})
    model = EncoderDecoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


SRC = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
TGT = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("extra", [{}, dict(pos="rope")])
def test_calibrated_merging_nothing_reproduces_the_model(extra):
    model = _byte_model(**extra)
    same = convert(model, n_kv_head=4, cross_n_kv_head=4, method="calibrated", calibration=_calibration())
    with torch.no_grad():
        torch.testing.assert_close(same(SRC, TGT), model(SRC, TGT), rtol=1e-4, atol=1e-4)


def test_calibrated_cross_attention_merges_heads_and_layers_exactly():
    """Cross-attention heads 1 and 3 are maps of heads 0 and 2, and layer 1's cross K/V maps of
    layer 0's (and 3's of 2's): keys and values all come from the one encoder output, so a calibrated
    GQA-2 shared by layer pairs carries them exactly; mean pooling does not."""
    model = _byte_model()
    D = model.cfg.head_dim
    g = torch.Generator().manual_seed(9)

    def mixed(w, b):
        mix = torch.randn(D, D, generator=g) / D ** 0.5 + torch.eye(D)
        return mix @ w, mix @ b

    with torch.no_grad():
        for first in (0, 2):
            lead = model.layers[first].cross_attn
            for proj in (lead.k_proj, lead.v_proj):
                for src, dst in ((0, 1), (2, 3)):
                    proj.weight[dst * D:(dst + 1) * D], proj.bias[dst * D:(dst + 1) * D] = mixed(
                        proj.weight[src * D:(src + 1) * D], proj.bias[src * D:(src + 1) * D])
            follow = model.layers[first + 1].cross_attn
            for a, b in ((lead.k_proj, follow.k_proj), (lead.v_proj, follow.v_proj)):
                for h in range(4):
                    b.weight[h * D:(h + 1) * D], b.bias[h * D:(h + 1) * D] = mixed(
                        a.weight[h * D:(h + 1) * D], a.bias[h * D:(h + 1) * D])
        ref = model(SRC, TGT)
        calibrated = convert(model, cross_n_kv_head=2, cross_cla=2, method="calibrated", calibration=_calibration())
        torch.testing.assert_close(calibrated(SRC, TGT), ref, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(convert(model, cross_n_kv_head=2, cross_cla=2)(SRC, TGT), ref, atol=1e-2)
    assert calibrated.cfg.cache_bytes().per_source_token * 4 == model.cfg.cache_bytes().per_source_token


def test_calibrated_beats_mean_pooling_on_a_trained_model():
    """A small byte-level T5 trained briefly on the built-in tasks, its decoder converted to MQA with
    cross-attention shared by layer pairs: the calibrated start has a lower target loss than mean
    pooling's (held-out pairs, no training after the conversion)."""
    from kvlab.data.seq2seq import Seq2SeqBatches, task_pairs
    from kvlab.io.tokenizer import ByteTokenizer
    from kvlab.training.objectives import Seq2SeqCrossEntropy

    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig.from_preset("t5-tiny", n_layer=2, n_encoder_layer=1))
    train = Seq2SeqBatches(task_pairs(256), ByteTokenizer(), 258, 16, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    objective = Seq2SeqCrossEntropy()
    for step in range(60):
        batch = train.batch(step)
        loss = objective.loss(model, batch) / objective.count(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    val = Seq2SeqBatches(task_pairs(64, seed=99), ByteTokenizer(), 258, 32).all_batches()

    def loss_of(m):
        with torch.no_grad():
            return sum(float(objective.loss(m, b)) for b in val) / sum(objective.count(b) for b in val)

    calib = Seq2SeqBatches(task_pairs(64, seed=7), ByteTokenizer(), 258, 16).all_batches()
    original = loss_of(model)
    mean = loss_of(convert(model, n_kv_head=1, cross_n_kv_head=1, cross_cla=2))
    calibrated = loss_of(convert(model, n_kv_head=1, cross_n_kv_head=1, cross_cla=2, method="calibrated",
                                 calibration=calib))
    assert original < calibrated < mean, (original, calibrated, mean)

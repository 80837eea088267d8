"""The encoder–decoder: against an independent float64 implementation (tests/naive.py), padding,
cached decoding, the cross-attention cache and its accounting."""

from __future__ import annotations

import pytest
import torch
from tests.naive import naive_seq2seq_logits

from kvlab import EncoderDecoder, ModelConfig, Transformer
from kvlab.config.accounting import cache_bytes, cross_cache_bytes
from kvlab.errors import ConfigError

VARIANTS = {
    # T5 v1.1's shape: relative bias per stack, unscaled scores, gated GELU, untied head.
    "t5-v1.1": dict(pos="t5", relative_buckets=8, relative_max_distance=12, attn_scale=1.0, mlp="geglu"),
    # The original T5: ReLU MLP, tied head with the output scaled by d_model ** -0.5.
    "t5-original": dict(pos="t5", relative_buckets=8, relative_max_distance=12, attn_scale=1.0, mlp="relu",
                        tie_embeddings=True, output_scale=32 ** -0.5),
    # The GQA paper's conversion targets: GQA self-attention, MQA cross-attention shared by 2 layers.
    "gqa-mqa-cross-cla": dict(pos="t5", relative_buckets=8, relative_max_distance=12, n_kv_head=2,
                              cross_n_kv_head=1, cross_cla=2),
    # RoPE instead of the bias, CLA in the decoder's self-attention, uneven cross sharing.
    "rope-cla": dict(pos="rope", n_kv_head=1, cla=2, cross_n_kv_head=2, cross_cla=3),
    # A windowed decoder (a rolling self-attention cache) beside the whole source.
    "rope-window": dict(pos="rope", n_kv_head=2, sliding_window=3),
}


def make(name: str, seed: int = 0, **extra) -> EncoderDecoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=4, n_head=4, n_encoder_layer=2, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0, **{**VARIANTS[name], **extra})
    model = EncoderDecoder(cfg).eval()
    with torch.no_grad():               # larger weights than the init, so that every path matters
        for p in model.parameters():
            p.normal_(0, 0.3)
        for i in range(cfg.n_layer):
            model.layers[i].cross_attn_layernorm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("backend", ["sdpa", "reference", "flash"])
def test_matches_float64_reference(name, backend):
    model = make(name)
    src, tgt = torch.randint(2, 40, (1, 9)), torch.randint(2, 40, (1, 6))
    ref = naive_seq2seq_logits(model, src[0], tgt[0])
    with torch.no_grad():
        out = model(src, tgt, backend=backend)[0].double()
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_source_padding_never_leaks(name):
    """Changing what stands at padded source positions (or padding left instead of right) changes
    nothing; each row equals its own unpadded run."""
    model = make(name)
    lengths = [9, 5, 7]
    src = torch.randint(2, 40, (3, 9))
    mask = (torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]).long()
    tgt = torch.randint(2, 40, (3, 6))
    with torch.no_grad():
        out = model(src, tgt, src_mask=mask)
        noisy = src.masked_fill(mask == 0, 7)
        assert torch.equal(model(noisy, tgt, src_mask=mask), out)
        left = torch.stack([torch.roll(s, 9 - n) for s, n in zip(noisy, lengths)])
        left_mask = torch.stack([torch.roll(m, 9 - n) for m, n in zip(mask, lengths)])
        assert torch.allclose(model(left, tgt, src_mask=left_mask), out, atol=1e-5)
        for row, n in enumerate(lengths):
            alone = model(src[row:row + 1, :n], tgt[row:row + 1])
            assert torch.allclose(alone[0], out[row], atol=1e-5)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decoding_equals_full_forward(name):
    """Prefill a few target tokens, then one at a time: the same logits as one full forward, over
    ragged sources."""
    model = make(name)
    src = torch.randint(2, 40, (2, 8))
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    tgt = torch.randint(2, 40, (2, 7))
    with torch.no_grad():
        full = model(src, tgt, src_mask=mask)
        cache = model.new_cache(2, 7)
        steps = [model(src, tgt[:, :3], src_mask=mask, cache=cache)]
        steps += [model(None, tgt[:, t:t + 1], cache=cache) for t in range(3, 7)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_cross_kv_projected_once_per_source():
    """Decoding many tokens projects the source's K/V once, in the producer layers only."""
    model = make("gqa-mqa-cross-cla")
    calls = []
    for i, block in enumerate(model.layers):
        for name in ("k_proj", "v_proj"):
            if hasattr(block.cross_attn, name):
                getattr(block.cross_attn, name).register_forward_hook(lambda *a, i=i: calls.append(i))
    src, tgt = torch.randint(2, 40, (2, 6)), torch.randint(2, 40, (2, 9))
    with torch.no_grad():
        cache = model.new_cache(2, 9)
        model(src, tgt[:, :1], cache=cache)
        for t in range(1, 9):
            model(None, tgt[:, t:t + 1], cache=cache)
    assert sorted(calls) == [0, 0, 2, 2]          # producers 0 and 2 (cross_cla=2), k and v once each
    with pytest.raises(ConfigError, match="already holds"):
        model(src, tgt[:, :1], cache=cache)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cache_bytes_match_allocation(name):
    model = make(name)
    cfg = model.cfg
    S, T, B = 6, 5, 3
    cache = model.new_cache(B, T)
    with torch.no_grad():
        model(torch.randint(2, 40, (B, S)), torch.randint(2, 40, (B, 2)), cache=cache)
    expected = B * cache_bytes(cfg, torch.float32).for_sequence(T, source_tokens=S)
    assert cache.nbytes == expected
    # the closed form: 2 × producers × heads × head_dim × bytes, per source token, beside the self cache
    producers = len(range(0, cfg.n_layer, cfg.cross_cla))
    assert cross_cache_bytes(cfg, "bf16").per_source_token == 2 * producers * cfg.cross_n_kv_head * cfg.head_dim * 2
    per_layer = 2 * cfg.n_kv_head * cfg.head_dim * 2
    if cfg.sliding_window is None:
        assert cache_bytes(cfg, "bf16").per_token == cfg.n_kv_layers * per_layer
    else:                               # rolling: each layer's K/V stop growing at the window
        assert cache_bytes(cfg, "bf16").bounded == ((per_layer, cfg.sliding_window),) * cfg.n_kv_layers


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_param_counts_closed_form(name):
    model = make(name)
    assert model.cfg.param_counts() == model.param_counts()


def test_planner_counts_source_tokens():
    """t5-v1.1-small (google/t5-v1_1-small's shape: 8 + 8 layers, 6 heads of 64): its sequences hold the
    self-attention K/V of the context and the cross-attention K/V of the source; every variant converts
    both alike."""
    from kvlab.eval.plan import plan

    cfg = ModelConfig.from_preset("t5-v1.1-small")
    assert cfg.param_counts()["total"] == 76_961_152            # the checkpoint's parameter count
    rows = {r.variant: r for r in plan(cfg, 2 ** 30, 512, "bf16", source_tokens=1024)}
    per = 2 * 8 * 64 * 2                                             # K and V, 8 layers, one head of 64, bf16
    assert rows["MHA"].kv_bytes_per_sequence == 6 * per * (512 + 1024)
    assert rows["MQA"].kv_bytes_per_sequence == per * (512 + 1024)
    assert rows["MQA-CLA2"].kv_bytes_per_sequence == per * (512 + 1024) // 2
    assert rows["MHA"].max_batch == (2 ** 30 - 2 * 76_961_152) // (6 * per * 1536)


def test_checkpoint_round_trip(tmp_path):
    import kvlab

    model = make("gqa-mqa-cross-cla")
    kvlab.save(model, tmp_path / "m")
    back = kvlab.load(tmp_path / "m")
    assert isinstance(back, EncoderDecoder) and back.cfg == model.cfg
    src, tgt = torch.randint(2, 40, (2, 6)), torch.randint(2, 40, (2, 4))
    with torch.no_grad():
        assert torch.equal(back(src, tgt), model(src, tgt))


def test_bad_configs_and_calls():
    with pytest.raises(ConfigError, match="n_encoder_layer=0"):
        ModelConfig(cross_n_kv_head=2)
    with pytest.raises(ConfigError, match="cross_n_kv_head=3 does not divide"):
        ModelConfig(n_encoder_layer=1, cross_n_kv_head=3)
    with pytest.raises(ConfigError, match="pos='alibi'"):
        ModelConfig(n_encoder_layer=1, pos="alibi")
    with pytest.raises(ConfigError, match="EncoderDecoder"):
        Transformer(ModelConfig(n_encoder_layer=1))
    model = make("t5-v1.1")
    tgt = torch.randint(2, 40, (1, 3))
    with pytest.raises(ConfigError, match="neither"):
        model(None, tgt)
    with pytest.raises(ConfigError, match="all padding"):
        model(torch.ones(1, 3, dtype=torch.long), tgt, src_mask=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="2 rows but tgt has 1"):
        model(torch.ones(2, 3, dtype=torch.long), tgt)

"""T5's learned relative position bias (``pos="t5"``) against transformers' T5 on the same
weights: the buckets, the bias a decoder layer adds, and a kvlab model whose scores carry it.
The kind contract (backends vs float64, decoding, checkpoints) runs on the "t5-bias" variants."""

from __future__ import annotations

import pytest
import torch

from kvlab.attention.bias import T5RelativeBias, t5_relative_buckets
from kvlab.config import ModelConfig
from kvlab.errors import ConfigError
from kvlab.models import Transformer

t5 = pytest.importorskip("transformers.models.t5.modeling_t5")


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("buckets, max_distance", [(32, 128), (8, 20), (6, 8), (4, 4)])
def test_buckets_equal_transformers(bidirectional, buckets, max_distance):
    relative = torch.arange(-300, 300)[None, :] + torch.arange(-3, 3)[:, None]
    want = t5.T5Attention._relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=buckets,
                                                    max_distance=max_distance)
    assert torch.equal(t5_relative_buckets(relative, buckets, max_distance, bidirectional), want)


def test_decoder_bias_equals_t5s_compute_bias():
    cfg = t5.T5Config(num_heads=4, d_model=32, d_kv=8, relative_attention_num_buckets=16,
                      relative_attention_max_distance=40, is_decoder=True)
    theirs = t5.T5Attention(cfg, has_relative_attention_bias=True)
    ours = T5RelativeBias(4, 16, 40)
    with torch.no_grad():
        ours.relative_attention_bias.weight.copy_(theirs.relative_attention_bias.weight)
    Tq, Tk = 9, 60
    want = theirs.compute_bias(Tq, Tk, past_seen_tokens=Tk - Tq)           # queries are the last Tq positions
    got = ours(torch.arange(Tk - Tq, Tk)[None], torch.arange(Tk)[None])
    torch.testing.assert_close(got, want)


def test_a_t5_model_adds_the_shared_bias_in_every_layer():
    """The model's scores carry the bias: zeroing it changes the logits, and a model whose bias
    favours the previous token by a wide margin attends almost only to it."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, pos="t5", relative_buckets=8,
                      relative_max_distance=16)
    model = Transformer(cfg).double().eval()
    tokens = torch.randint(0, 40, (2, 12))
    before = model(tokens)
    assert model.param_counts() == cfg.param_counts()
    assert model.param_counts()["embedding"] == 40 * 32 + 8 * 4
    with torch.no_grad():
        model.embed_relative.relative_attention_bias.weight.zero_()
    assert not torch.allclose(model(tokens), before)
    # Bucket 1 = distance 1: a +50 bias there makes attention a one-hot on the previous token.
    with torch.no_grad():
        model.embed_relative.relative_attention_bias.weight[1] = 50.0
    attn = model.layers[0].self_attn
    seen = {}
    attn.o_proj.register_forward_hook(lambda m, i, o: seen.setdefault("heads", i[0]))
    model(tokens)
    h = model.layers[0].input_layernorm(model.embed_tokens(tokens))
    v = attn.v_proj(h)
    torch.testing.assert_close(seen["heads"][:, 1:], v[:, :-1], rtol=1e-6, atol=1e-6)


def test_bucket_settings_are_checked():
    with pytest.raises(ConfigError, match="relative_buckets=64 with relative_max_distance=32"):
        ModelConfig(pos="t5", relative_buckets=64, relative_max_distance=32)
    with pytest.raises(ConfigError, match="relative_buckets"):
        ModelConfig(pos="t5", relative_buckets=0)

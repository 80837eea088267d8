import pytest
import torch

from kvlab import ConfigError
from kvlab.convert.heads import convert

from conftest import make_model

TOKENS = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(3))


def _k(model, layer, leaf="k_proj.weight"):
    return model.state_dict()[f"layers.{layer}.self_attn.{leaf}"]


def test_mean_pooling_to_n_head_is_identity():
    mha = make_model(n_kv_head=4)
    same = convert(mha, n_kv_head=4, method="mean")
    assert torch.equal(same(TOKENS), mha(TOKENS))


def test_pooling_identical_heads_keeps_logits():
    model = make_model(n_kv_head=4, qkv_bias=True)
    D = model.cfg.head_dim
    with torch.no_grad():   # make heads 0,1 equal and heads 2,3 equal in every layer
        for layer in model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                for t in (proj.weight, proj.bias):
                    t[D:2 * D] = t[:D]
                    t[3 * D:4 * D] = t[2 * D:3 * D]
    gqa = convert(model, n_kv_head=2, method="mean")
    torch.testing.assert_close(gqa(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("leaf", ["k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"])
def test_pooled_weights_equal_hand_computed_means(leaf):
    model = make_model(n_kv_head=4, qkv_bias=True)
    D = model.cfg.head_dim
    mqa = convert(model, n_kv_head=1, method="mean")
    gqa = convert(model, n_kv_head=2, method="mean")
    first = convert(model, n_kv_head=2, method="first")
    for layer in range(model.cfg.n_layer):
        old = _k(model, layer, leaf)
        heads = [old[h * D:(h + 1) * D] for h in range(4)]
        torch.testing.assert_close(_k(mqa, layer, leaf), (heads[0] + heads[1] + heads[2] + heads[3]) / 4)
        torch.testing.assert_close(_k(gqa, layer, leaf),
                                   torch.cat([(heads[0] + heads[1]) / 2, (heads[2] + heads[3]) / 2]))
        assert torch.equal(_k(first, layer, leaf), torch.cat([heads[0], heads[2]]))


def test_random_method_is_fresh_and_seeded():
    model = make_model(n_kv_head=4)
    a, b, c = (convert(model, n_kv_head=1, method="random", seed=s) for s in (1, 1, 2))
    assert torch.equal(_k(a, 0), _k(b, 0)) and not torch.equal(_k(a, 0), _k(c, 0))
    assert abs(_k(a, 0).std().item() - 0.02) < 0.004
    assert not torch.allclose(_k(a, 0), _k(convert(model, n_kv_head=1), 0))
    assert torch.equal(_k(a, 0, "q_proj.weight"), _k(model, 0, "q_proj.weight"))   # queries untouched


def test_cla_conversion_mean_and_first():
    model = make_model(n_kv_head=2, n_layer=7)
    cla = convert(model, cla=3, method="mean")
    assert cla.cfg.kv_producers == [0, 3, 6]
    for p, group in ((0, [0, 1, 2]), (3, [3, 4, 5]), (6, [6])):
        torch.testing.assert_close(_k(cla, p), sum(_k(model, i) for i in group) / len(group))
        torch.testing.assert_close(_k(cla, p, "v_proj.weight"),
                                   sum(_k(model, i, "v_proj.weight") for i in group) / len(group))
    for i in (1, 2, 4, 5):
        assert not hasattr(cla.layers[i].self_attn, "k_proj")
    first = convert(model, cla=3, method="first")
    assert torch.equal(_k(first, 3), _k(model, 3))
    cache = cla.new_cache(2, 8)
    assert sorted(cache.keys) == [0, 3, 6] and cache.keys[0].shape[1] == 2


def test_mqa_cla2_combined_and_cache_heads():
    model = make_model(n_kv_head=4, n_layer=4)
    both = convert(model, n_kv_head=1, cla=2, method="mean")
    expected = sum(_k(model, i).reshape(4, -1, 64).mean(0) for i in (0, 1)) / 2
    torch.testing.assert_close(_k(both, 0), expected)
    assert both.new_cache(1, 4).keys[2].shape == (1, 1, 4, 16)
    assert both.cfg.kv_bytes_per_token("bf16") == model.cfg.kv_bytes_per_token("bf16") // 8
    step = both.provenance["steps"][-1]
    assert step["op"] == "convert" and step["method"] == "mean" and step["n_kv_head"] == [4, 1] and step["cla"] == 2
    # Incremental decoding still equals the full forward after conversion.
    cache = both.new_cache(2, 15)
    inc = torch.cat([both(TOKENS[:, :9], cache=cache)]
                    + [both(TOKENS[:, t:t + 1], cache=cache) for t in range(9, 15)], 1)
    torch.testing.assert_close(inc, both(TOKENS), rtol=1e-5, atol=1e-5)


def test_conversion_of_an_already_cla_model_uses_effective_projections():
    model = make_model(n_kv_head=2, n_layer=4, cla=2)          # producers 0, 2
    whole = convert(model, cla=4, method="mean")               # producer 0 for all four layers
    expected = (2 * _k(model, 0) + 2 * _k(model, 2)) / 4        # layers 1 and 3 read 0 and 2
    torch.testing.assert_close(_k(whole, 0), expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_kv_head=3), r"cannot pool n_kv_head=4 into 3 KV heads.*one of \[1, 2, 4\]"),
    (dict(n_kv_head=8), "cannot pool n_kv_head=4 into 8"),
    (dict(method="median", n_kv_head=1), "method='median' is not one of"),
    (dict(), "nothing to convert"),
    (dict(cla=9), "cla=9 exceeds n_layer=4"),
])
def test_conversion_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        convert(make_model(n_kv_head=4), **kwargs)

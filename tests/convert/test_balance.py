"""Keys stored centred and balanced against the queries (kvlab.convert.balance): the same outputs as
the naive float64 model on the original weights, the fitted vectors against a float64 computation
with explicit RoPE matrices, less rounding error in an int4 cache, and what carries the balance
(checkpoints, the decode kernel) and what drops it (exports, conversions)."""

import numpy as np
import pytest
import torch

import kvlab
from kvlab import ConfigError, ModelConfig
from kvlab.convert.balance import BALANCE_STRENGTH, balance_keys, balanceable_layers
from kvlab.convert.heads import convert
from kvlab.io.hf import export_hf

from conftest import VARIANTS, make_model
from naive import naive_sequence_logits, rope_matrices

GQA_VARIANTS = [name for name, o in VARIANTS.items()
                if o.get("attn_kind", "gqa") == "gqa" and "attention_layers" not in o and name != "streaming-sinks"]


def _tokens(B, T, seed=1, vocab=256):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _offset_keys(model, size=6.0):
    """What trained models' keys have and random ones lack: a few channels with a large offset common
    to every token — RoPE's slowest pairs, the last of each half, which turn too slowly to move it. A
    key bias puts it there."""
    with torch.no_grad():
        for layer in model.layers:
            attn = layer.self_attn
            if getattr(attn, "k_proj", None) is not None and attn.k_proj.bias is not None:
                D = attn.head_dim
                for h in range(attn.n_kv_head):
                    attn.k_proj.bias[[h * D + c for c in (D // 2 - 2, D // 2 - 1, D - 1)]] += size
    return model


def _sharp(model, factor=8.0):
    """Scores of order one (a random model's are ~1e-3, where attention is nearly uniform and a wrong
    balance would hardly show)."""
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            if getattr(layer.self_attn, "k_proj", None) is not None:
                layer.self_attn.k_proj.weight.mul_(factor)
    return model


@pytest.mark.parametrize("variant", GQA_VARIANTS)
def test_a_balanced_model_computes_what_its_weights_do(variant):
    """Decoding through a cache that holds the keys balanced (a float cache told to, so that nothing is
    rounded) against the naive float64 model of the same weights (which knows nothing of the balance;
    its own tables hold it to ~1e-7) and the model as projected (float64 rounding apart)."""
    model = _sharp(make_model(**VARIANTS[variant])).double()
    balanced = balance_keys(model, [_tokens(2, 24, seed=3)]).eval()
    assert balanced.cfg.key_balance and not model.cfg.key_balance
    shifts = [m.key_shift for m in (layer.self_attn for layer in balanced.layers) if hasattr(m, "key_shift")]
    assert shifts and all(s.abs().max() > 0.1 for s in shifts)    # it moved the keys: the test can fail
    tokens = _tokens(2, 13)
    with torch.no_grad():
        logits = balanced(tokens)
        torch.testing.assert_close(logits, model(tokens), rtol=1e-10, atol=1e-10)
        for b in range(2):
            torch.testing.assert_close(logits[b], naive_sequence_logits(model, tokens[b]), rtol=1e-5, atol=1e-5)
        cache = balanced.new_cache(2, 16)
        cache.keys_in_codes = lambda layer: True                 # what an int8/int4 cache says
        pieces = [balanced(tokens[:, :6], cache=cache)]
        for t in range(6, 13):
            pieces.append(balanced(tokens[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, 1), logits, rtol=1e-10, atol=1e-10)
    stored = [layer.self_attn.stored_keys for layer in balanced.layers if hasattr(layer.self_attn, "key_shift")]
    k = torch.randn(2, model.cfg.n_kv_head, 3, model.cfg.head_dim, dtype=torch.float64)
    assert not torch.allclose(stored[0](k, True), k)             # the path above did move the keys


def test_the_vectors_are_the_keys_mean_and_the_balance_of_spread_and_query_size():
    """shift = the keys' mean after RoPE; scale = (σ_k / rms_q)^α per channel, the queries pooled over
    a KV head's group and its CLA consumers, with a geometric mean of 1 per head (float64 here)."""
    model = _offset_keys(make_model(n_kv_head=2, cla=2, qkv_bias=True)).double()
    batches = [_tokens(3, 20, seed=5), _tokens(2, 20, seed=6)]
    balanced = balance_keys(model, batches)
    cfg = model.cfg
    H, D, G = cfg.n_kv_head, cfg.head_dim, cfg.n_head // cfg.n_kv_head
    captured = {}
    hooks = [getattr(model.layers[i].self_attn, f"{f}_proj").register_forward_hook(
        lambda m, a, out, key=(i, f): captured.__setitem__(key, out.detach()))
        for i in range(cfg.n_layer) for f in ("q", "k") if hasattr(model.layers[i].self_attn, f"{f}_proj")]
    keys, queries = {}, {}
    with torch.no_grad():
        for tokens in batches:
            model(tokens)
            B, T = tokens.shape
            R = rope_matrices(np.arange(T), D, cfg.rope_theta)
            for (i, f), x in captured.items():
                n = H if f == "k" else cfg.n_head
                x = np.einsum("tij,bthj->bthi", R, x.view(B, T, n, D).numpy())    # (B, T, n, D), rotated
                p = cfg.kv_sources[i]
                if f == "k":
                    keys.setdefault(p, []).append(x.reshape(-1, H, D))
                else:
                    queries.setdefault(p, []).append(x.reshape(B * T, H, G, D).transpose(0, 2, 1, 3).reshape(-1, H, D))
    for h in hooks:
        h.remove()
    for p in cfg.kv_producers:
        k, q = np.concatenate(keys[p]), np.concatenate(queries[p])
        scale = (k.std(0) / np.sqrt((q * q).mean(0))) ** BALANCE_STRENGTH
        scale /= np.exp(np.log(scale).mean(-1, keepdims=True))
        attn = balanced.layers[p].self_attn
        # (kvlab's RoPE tables are float32: 1e-7 apart from these)
        np.testing.assert_allclose(attn.key_shift.numpy(), k.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(attn.key_scale.numpy(), scale, rtol=1e-5)
        consumer = balanced.layers[p + 1].self_attn                         # CLA: its producer's scale
        assert not hasattr(consumer, "key_shift")
        torch.testing.assert_close(consumer.key_scale, attn.key_scale)
    assert float(balanced.layers[0].self_attn.key_shift[:, D // 2 - 1].min()) > 3    # the offset it removes


@torch.no_grad()
def test_an_int4_cache_of_balanced_keys_rounds_far_less():
    """The same int4 cache (and its rotated form) on the model as projected and balanced: the error of
    the logits against the float cache's falls several times where a few key channels carry an offset."""
    model = _offset_keys(make_model(n_kv_head=2, d_model=128, n_head=2, qkv_bias=True))     # 64-wide heads
    balanced = balance_keys(model, [_tokens(4, 64, seed=7)]).eval()
    tokens = _tokens(2, 40, seed=8)
    exact = model(tokens)
    torch.testing.assert_close(balanced(tokens), exact, rtol=1e-4, atol=1e-4)

    def error(m, kv_quant):
        cache = m.new_cache(2, 40, kv_quant=kv_quant)
        pieces = [m(tokens[:, :32], cache=cache)] + [m(tokens[:, t:t + 1], cache=cache) for t in range(32, 40)]
        return float((torch.cat(pieces, 1) - exact).pow(2).mean())
    # int4 keys (values in int8 round next to nothing); a rotation spreads the offset already, so less is left
    for fmt, factor in (("int4/int8", 4), ("int4-h/int8", 2)):
        assert error(balanced, fmt) < error(model, fmt) / factor, fmt
    assert error(balanced, "fp8") == error(model, "fp8")        # fp8 keeps the keys as projected


def test_the_checkpoint_keeps_the_balance_and_exports_leave_it_out(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _offset_keys(make_model(n_kv_head=2, qkv_bias=True))
    balanced = balance_keys(model, [_tokens(2, 32, seed=9)]).eval()
    tokens = _tokens(2, 11)
    kvlab.save(balanced, tmp_path / "ckpt")
    loaded = kvlab.load(tmp_path / "ckpt")
    assert loaded.cfg.key_balance
    torch.testing.assert_close(loaded.layers[0].self_attn.key_shift, balanced.layers[0].self_attn.key_shift)
    torch.testing.assert_close(loaded(tokens), balanced(tokens))
    export_hf(balanced, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, balanced(tokens), rtol=1e-4, atol=1e-4)


def test_a_conversion_drops_the_balance_and_can_balance_again():
    model = _offset_keys(make_model(n_kv_head=2, qkv_bias=True))
    batches = [_tokens(2, 32, seed=10)]
    balanced = balance_keys(model, batches)
    mqa = convert(balanced, method="mean", n_kv_head=1)
    assert not mqa.cfg.key_balance and not hasattr(mqa.layers[0].self_attn, "key_shift")
    plain = convert(model, method="mean", n_kv_head=1)
    tokens = _tokens(2, 9)
    torch.testing.assert_close(mqa(tokens), plain(tokens))
    again = balance_keys(mqa, batches)
    assert again.cfg.key_balance and tuple(again.layers[0].self_attn.key_shift.shape) == (1, model.cfg.head_dim)
    steps = [s["method"] for s in again.provenance["steps"] if s.get("op") == "convert"]
    assert steps[-1] == "key-balance"


def test_what_cannot_be_balanced_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="sink_positions"):
        ModelConfig.from_preset("tiny", **VARIANTS["streaming-sinks"], key_balance=True)
    with pytest.raises(ConfigError, match="sink_positions"):
        balance_keys(make_model(**VARIANTS["streaming-sinks"]), [_tokens(1, 8)])
    with pytest.raises(ConfigError, match="has none"):
        balance_keys(make_model(**VARIANTS["mla"]), [_tokens(1, 8)])
    assert balanceable_layers(make_model(**VARIANTS["linear-hybrid"]).cfg) == [1, 3]
    with pytest.raises(ConfigError, match="at least one batch"):
        balance_keys(make_model(), [])
    from kvlab.peft.prefix import PromptConfig, add_prompt_adapter

    with pytest.raises(ConfigError, match="tune the model before balancing"):
        add_prompt_adapter(balance_keys(make_model(), [_tokens(1, 8)]), PromptConfig("prefix", 4))
    tuned = make_model()
    add_prompt_adapter(tuned, PromptConfig("prefix", 4))
    with pytest.raises(ConfigError, match="prompt adapter"):
        balance_keys(tuned, [_tokens(1, 8)])

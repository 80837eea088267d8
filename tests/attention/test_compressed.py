"""Memory compression (the ``compressed`` kind): what its cache holds as a sequence grows, against
the closed form written out here; its options; ``kvlab info``. The rule itself is checked against
a float64 loop over its definition (tests/naive.py) and the kind contract in test_kinds.py."""

from __future__ import annotations

import json

import pytest
import torch

from kvlab import ModelConfig, Transformer, cache_bytes
from kvlab.cli import main
from kvlab.errors import ConfigError


def _cfg(**kw):
    return ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=4096,
                       attention_layers=[{"kind": "compressed", "window": 64, "block": 16}, "gqa"], **kw)


def test_memory_is_the_window_plus_one_slot_per_block():
    cfg = _cfg()
    raw = 2 * 2 * 8 * 4                       # K and V, 2 KV heads of 8, fp32: bytes per token
    slot = 2 * 2 * 8 * 4 + 4                  # fp32 sums of K and V, and a count
    full = raw                                # the gqa layer: per token
    for n in (1, 64, 65, 1000, 4096):
        want = raw * min(n, 64) + slot * -(-n // 16) + full * n
        assert cache_bytes(cfg, torch.float32).for_sequence(n) == want
    model = Transformer(cfg)
    cache = model.new_cache(3, 1000, dtype=torch.float32)
    assert cache.nbytes == 3 * cache_bytes(cfg, torch.float32).for_sequence(1000)


def test_generating_far_past_the_window_matches_the_full_forward():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=512,
                                    attention_layers=[{"kind": "compressed", "window": 8, "block": 4}] * 2)).double()
    tokens = torch.randint(0, 64, (2, 100))
    full = model(tokens)
    cache = model.new_cache(2, 100, dtype=torch.float64)
    steps = [model(tokens[:, :30], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(30, 100)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    # The summaries matter: the same window without them gives other logits.
    windowed = Transformer(model.cfg.replace(attention_layers=None, sliding_window=8)).double()
    windowed.load_state_dict(model.state_dict())
    assert not torch.allclose(windowed(tokens)[:, 20:], full[:, 20:], atol=1e-3)


@pytest.mark.parametrize("spec, match", [
    ({"kind": "compressed", "window": 8}, "needs block"),
    ({"kind": "compressed", "window": 4, "block": 8}, "block=8 exceeds window=4"),
    ({"kind": "compressed", "window": 0, "block": 1}, "needs window"),
])
def test_bad_options_are_named(spec, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(n_layer=2, attention_layers=[spec, "gqa"])


def test_no_cla_and_no_distance_bias():
    with pytest.raises(ConfigError, match="shares no KV across layers"):
        ModelConfig(n_layer=2, kv_source=[0, 0], attention_layers=[{"kind": "compressed", "window": 4, "block": 2}] * 2)
    with pytest.raises(ConfigError, match="no single position for a alibi distance bias"):
        ModelConfig(n_layer=2, pos="alibi", attention_layers=[{"kind": "compressed", "window": 4, "block": 2}] * 2)


def test_info_shows_the_compressed_memory(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_cfg().to_dict()))
    assert main(["info", "--config", str(path), "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "compressed(window 64, summary per 16 older tokens), gqa" in out
    assert "132 B per 16 tokens" in out
    assert main(["info", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_bytes_pooled"] == [{"bytes_per_slot": 132,
                                                                          "tokens_per_slot": 16}]

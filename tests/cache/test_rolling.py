"""The rolling K/V cache of windowed layers: bounded memory, sinks, decoding past the model's
training length, ragged rows and chunked prefill — each against a full forward of the same tokens."""

import pytest
import torch

from kvlab import ConfigError, ModelConfig, cache_bytes
from kvlab.cache.rolling import RollingKVLayer

from conftest import make_model

WINDOWED = dict(n_kv_head=2, sliding_window=4, attention_sinks=2, max_seq_len=16)


def _tokens(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_a_windowed_producer_keeps_sinks_plus_window_entries_whatever_the_length():
    model = make_model(**WINDOWED)
    for max_len in (7, 64, 4096):
        cache = model.new_cache(3, max_len, dtype=torch.bfloat16)
        slots = min(max_len, 2 + 4)
        for layer in cache.layers.values():
            assert layer.keys.shape == (3, 2, slots, 16) and layer.values.shape == (3, 2, slots, 16)
        # Written out independently: 4 layers x K and V x 2 heads x 16 channels x 2 bytes x slots x rows.
        assert cache.nbytes == 4 * 2 * 2 * 16 * 2 * slots * 3
        assert cache.nbytes == 3 * cache_bytes(model.cfg, torch.bfloat16).for_sequence(max_len)
    assert model.cfg.kv_bytes_per_token("bf16") == 0          # nothing grows with the context


def test_a_global_reader_keeps_its_producer_on_the_full_cache():
    # Layers 0 and 1 share layer 0's KV; layer 1 is global, so layer 0 cannot roll.
    cfg_layers = [{"kind": "gqa", "window": 3}, "gqa", {"kind": "gqa", "window": 3}, {"kind": "gqa", "window": 3}]
    model = make_model(n_kv_head=2, kv_source=[0, 0, 2, 2], attention_layers=cfg_layers)
    cache = model.new_cache(1, 32)
    assert not isinstance(cache.layers[0], RollingKVLayer) and cache.layers[0].keys.shape[2] == 32
    assert isinstance(cache.layers[2], RollingKVLayer) and cache.layers[2].keys.shape[2] == 3


@torch.no_grad()
def test_greedy_decoding_four_times_past_the_training_length_in_constant_memory():
    model = make_model(**WINDOWED)
    prompt = _tokens(1, 3)
    steps = 4 * model.cfg.max_seq_len
    cache = model.new_cache(1, 3 + steps)
    start_bytes = cache.nbytes
    assert start_bytes == model.new_cache(1, 10_000).nbytes          # allocation independent of the length
    tokens, logits = prompt, model(prompt, cache=cache)[:, -1:]
    step_logits = [logits]
    for _ in range(steps - 1):
        nxt = logits.argmax(-1)
        tokens = torch.cat([tokens, nxt], 1)
        logits = model(nxt, cache=cache)
        step_logits.append(logits)
    assert cache.nbytes == start_bytes and int(cache.lengths[0]) == tokens.shape[1] == 3 + steps - 1
    full = model(tokens)                                              # the same tokens, no cache
    torch.testing.assert_close(torch.cat(step_logits, 1), full[:, 2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_across_the_wrap_around_equals_the_full_forward(chunk):
    model = make_model(**WINDOWED)
    tokens = _tokens(2, 21, seed=1)
    cache = model.new_cache(2, 21)
    pieces = [model(tokens[:, i:i + chunk], cache=cache) for i in range(0, 21, chunk)]
    torch.testing.assert_close(torch.cat(pieces, 1), model(tokens), rtol=1e-5, atol=1e-5)


def test_ragged_rows_decode_like_each_row_alone():
    model = make_model(**WINDOWED)
    long, short = _tokens(1, 9, seed=2), _tokens(1, 4, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([long, torch.cat([pad, short], 1)])            # left-padded second row
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :5] = 0
    cache = model.new_cache(2, 20)
    first = model(batch, attention_mask=mask, cache=cache)[:, -1:]
    more = _tokens(2, 8, seed=4)
    steps = [model(more[:, t:t + 1], cache=cache) for t in range(8)]
    got = torch.cat([first, *steps], 1)
    for row, prompt in ((0, long), (1, short)):
        alone = model(torch.cat([prompt, more[row:row + 1]], 1))
        torch.testing.assert_close(got[row], alone[0, prompt.shape[1] - 1:], rtol=1e-5, atol=1e-5)


def test_sinks_are_kept_forever_and_reset_clears_the_cache():
    model = make_model(**WINDOWED)
    cache = model.new_cache(1, 40)
    model(_tokens(1, 30), cache=cache)
    layer = cache.layers[0]
    assert sorted(layer.pos[0].tolist()) == [0, 1, 26, 27, 28, 29]   # sinks 0-1, window 26-29
    cache.reset()
    assert (layer.pos == -1).all() and cache.is_empty
    tokens = _tokens(1, 12, seed=5)
    torch.testing.assert_close(model(tokens, cache=cache), model(tokens), rtol=1e-5, atol=1e-5)


def test_sink_options_are_checked():
    with pytest.raises(ConfigError, match="attention_sinks=-1"):
        ModelConfig.from_preset("tiny", attention_sinks=-1)
    with pytest.raises(ConfigError, match="sinks=2 without a window"):
        ModelConfig.from_preset("tiny", attention_layers=[{"kind": "gqa", "sinks": 2}, "gqa", "gqa", "gqa"])
    with pytest.raises(ConfigError, match="prefix tuning needs a full KV cache"):
        make_model(**WINDOWED).new_cache(1, 32).write_prefix({0: (torch.zeros(1, 2, 2, 16),) * 2})

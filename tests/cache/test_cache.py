import pytest
import torch

from kvlab import CacheOverflowError, ConfigError, ModelConfig

from conftest import VARIANTS, make_model

# Full K/V layers; MLA's latent cache is checked in tests/attention/test_mla.py, rolling windows in
# tests/cache/test_rolling.py.
FULL_KV = [name for name, v in VARIANTS.items() if v.get("attn_kind", "gqa") == "gqa"
           and v.get("sliding_window") is None and "window" not in str(v.get("attention_layers"))
           and "linear" not in str(v.get("attention_layers"))]


@pytest.mark.parametrize("name", FULL_KV)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cache_holds_producers_only_and_nbytes_is_the_formula(name, dtype):
    model = make_model(**VARIANTS[name])
    cfg = model.cfg
    cache = model.new_cache(3, 17, dtype=dtype)
    assert sorted(cache.keys) == sorted(cache.values) == cfg.kv_producers
    for t in (*cache.keys.values(), *cache.values.values()):
        assert t.shape == (3, cfg.n_kv_head, 17, cfg.head_dim) and t.dtype == dtype
    # Closed form written out here, independently of kvlab's function.
    expected = 2 * len(set(cfg.kv_sources)) * cfg.n_kv_head * cfg.head_dim * dtype.itemsize * 3 * 17
    assert cache.nbytes == expected == cfg.kv_bytes_per_token(dtype) * 3 * 17


def test_overflow_raises_before_writing():
    model = make_model()
    cache = model.new_cache(2, 6)
    model(torch.zeros(2, 4, dtype=torch.long), cache=cache)
    before = cache.keys[0].clone()
    with pytest.raises(CacheOverflowError, match=r"max_len=6 would overflow.*larger max_len"):
        model(torch.ones(2, 3, dtype=torch.long), cache=cache)
    assert torch.equal(cache.keys[0], before) and cache.lengths.tolist() == [4, 4]
    model(torch.ones(2, 2, dtype=torch.long), cache=cache)       # exactly full is fine
    assert cache.lengths.tolist() == [6, 6]


def test_ragged_rows_are_compacted_and_lengths_tracked():
    model = make_model()
    cache = model.new_cache(2, 8)
    tokens = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    model(tokens, attention_mask=mask, cache=cache)
    assert cache.lengths.tolist() == [2, 4]
    # Row 0's two real tokens sit in slots 0 and 1; slots 2.. are untouched zeros.
    assert cache.keys[0][0, :, :2].abs().sum() > 0 and cache.keys[0][0, :, 2:].abs().sum() == 0
    model(torch.tensor([[1], [2]]), cache=cache)
    assert cache.lengths.tolist() == [3, 5]
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]


def test_cache_used_under_inference_mode_can_be_reset_outside_it():
    model = make_model()
    cache = model.new_cache(2, 8)
    with torch.inference_mode():
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    cache.reset()
    cache.assume_filled(5)
    assert cache.lengths.tolist() == [5, 5]
    out = model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert out.shape == (2, 1, 320) and cache.lengths.tolist() == [6, 6]


def test_cache_errors():
    model = make_model()
    with pytest.raises(ConfigError, match="batch_size=0"):
        model.new_cache(0, 4)
    with pytest.raises(ConfigError, match="allocated for batch_size=2"):
        model(torch.zeros(3, 2, dtype=torch.long), cache=model.new_cache(2, 4))
    with pytest.raises(ConfigError, match=r"attention_mask has shape \(2, 3\)"):
        model(torch.zeros(2, 2, dtype=torch.long), attention_mask=torch.ones(2, 3), cache=model.new_cache(2, 4))


def test_smollm2_kv_bytes():
    cfg = ModelConfig.from_preset("smollm2-135m")
    assert cfg.kv_bytes_per_token("bf16") == 23040
    assert cfg.replace(n_kv_head=1, cla=2).kv_bytes_per_token("bf16") == 3840
    assert cfg.kv_bytes_per_token("fp32") == 46080

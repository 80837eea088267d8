"""The paged pool against the model run without a cache: sequences of different lengths, prefilled in
chunks one at a time and decoded together, joining and leaving the batch, give the logits of a plain
forward over each whole sequence — for every attention variant."""

import pytest
import torch

from kvlab.cache.paged import PagedKVPool
from kvlab.config.accounting import cache_bytes
from kvlab.errors import CacheOverflowError, ConfigError

from conftest import VARIANTS, make_model


def _plain_last_logits(model, ids):
    return model(torch.tensor([ids]))[0, -1]


def _step(model, pool, seqs, chunks):
    """One forward call over ``seqs`` with one chunk of tokens each (all chunks the same length)."""
    for s, c in zip(seqs, chunks):
        assert pool.reserve(s, s.length + len(c))
    return model(torch.tensor(chunks), cache=pool.batch(seqs))[:, -1]


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.inference_mode()
def test_paged_batches_equal_plain_forward(name):
    model = make_model(**VARIANTS[name])
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (11, 4, 23)]
    pool = PagedKVPool(model.cfg, budget_bytes=2**22, max_len=64, block_size=4)
    seqs, texts = [], []
    # A and B prefilled (A in chunks of 5), then decoded together; C joins after two decode steps.
    for p in prompts[:2]:
        s = pool.new_sequence()
        for i in range(0, len(p), 5):
            out = _step(model, pool, [s], [p[i:i + 5]])
        torch.testing.assert_close(out[0], _plain_last_logits(model, p), atol=2e-4, rtol=1e-4)
        seqs.append(s)
        texts.append(list(p))
    for t in range(6):
        if t == 2:
            s = pool.new_sequence()
            _step(model, pool, [s], [prompts[2]])
            seqs.append(s)
            texts.append(list(prompts[2]))
        if t == 4:                      # B leaves; its blocks go back to the pool
            pool.release(seqs[1])
            del seqs[1], texts[1]
        nxt = torch.randint(0, V, (len(seqs),), generator=g).tolist()
        for text, tok in zip(texts, nxt):
            text.append(tok)
        out = _step(model, pool, seqs, [[t] for t in nxt])
        for row, text in enumerate(texts):
            torch.testing.assert_close(out[row], _plain_last_logits(model, text), atol=2e-4, rtol=1e-4)


def test_budget_in_bytes_scales_with_the_cache():
    """A k-times smaller cache gets k times the blocks, and a block's bytes are the accounting's."""
    mha, mqa = make_model(n_kv_head=4).cfg, make_model(n_kv_head=1).cfg
    budget = 3 * 2**20
    a = PagedKVPool(mha, budget_bytes=budget, max_len=128, block_size=16)
    b = PagedKVPool(mqa, budget_bytes=budget, max_len=128, block_size=16)
    assert a.block_bytes == cache_bytes(mha, torch.float32).per_token * 16
    assert a.num_blocks == budget // a.block_bytes
    assert b.num_blocks == 4 * a.num_blocks
    assert a.nbytes <= budget and a.nbytes > budget - a.block_bytes
    assert b.max_sequences(100) >= 4 * a.max_sequences(100) - 3


def test_blocks_are_reserved_and_released():
    cfg = make_model(n_kv_head=2).cfg
    pool = PagedKVPool(cfg, budget_bytes=cache_bytes(cfg, torch.float32).per_token * 8 * 5, max_len=64, block_size=8)
    assert pool.num_blocks == 5
    s, t = pool.new_sequence(), pool.new_sequence()
    assert pool.reserve(s, 17) and len(s.blocks) == 3
    assert not pool.reserve(t, 24) and t.blocks == []        # needs 3, 2 free: nothing taken
    assert pool.reserve(t, 16) and pool.free_blocks == 0
    pool.release(s)
    assert pool.free_blocks == 3 and pool.reserve(t, 40)
    with pytest.raises(CacheOverflowError, match="max_len=64"):
        pool.reserve(t, 65)


def test_a_call_beyond_the_reserved_blocks_is_refused():
    model = make_model(n_kv_head=2)
    pool = PagedKVPool(model.cfg, budget_bytes=2**20, max_len=64, block_size=4)
    s = pool.new_sequence()
    assert pool.reserve(s, 4)
    with pytest.raises(CacheOverflowError, match="reserve"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=pool.batch([s]))


def test_a_budget_too_small_is_one_clear_error():
    cfg = make_model(n_kv_head=2).cfg
    with pytest.raises(ConfigError, match="holds no block"):
        PagedKVPool(cfg, budget_bytes=100, max_len=64)

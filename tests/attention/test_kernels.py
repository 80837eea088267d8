import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.attention import AttentionMask, BlockSparse, attention, may_attend, positions_from_attention_mask
from kvlab.errors import ConfigError

BACKENDS = ["reference", "sdpa", "flash", "triton"]


def naive_attention_f64(q, k, v, allowed):
    """Loop over rows and query heads; head h reads KV head h // (Hq // Hkv). allowed: (B, Tq, Tk)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Tq, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for t in range(Tq):
                keys = allowed[b, t].nonzero().flatten()
                if len(keys) == 0:
                    continue
                s = k[b, h // group, keys] @ q[b, h, t] / math.sqrt(D)
                out[b, h, t] = torch.softmax(s, 0) @ v[b, h // group, keys]
    return out


def _qkv(B, Hq, Hkv, Tq, Tk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype))


def _padding(B, T, seed=0, left=True):
    """A (B, T) 0/1 mask with a different number of padding tokens per row (row 0 unpadded)."""
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        n_pad = (b * 3 + seed) % T
        if left:
            mask[b, :n_pad] = 0
        else:
            mask[b, T - n_pad:] = 0
    return mask


CASES = {
    "causal": lambda B, T: AttentionMask(torch.arange(T)[None], torch.arange(T)[None], plain_causal=True),
    "non-causal": lambda B, T: None,
    "left-padded-causal": lambda B, T: _padded_mask(B, T, left=True, causal=True),
    "right-padded-causal": lambda B, T: _padded_mask(B, T, left=False, causal=True),
    "padded-non-causal": lambda B, T: _padded_mask(B, T, left=True, causal=False),
    "sliding-window": lambda B, T: AttentionMask(torch.arange(T)[None], torch.arange(T)[None], window=3),
    "padded-window": lambda B, T: _padded_mask(B, T, left=True, causal=True, window=2),
    "window-sinks": lambda B, T: AttentionMask(torch.arange(T)[None], torch.arange(T)[None], window=3, sinks=2),
    # What a rolling cache hands over: an empty slot (-1, invalid), sinks 0-1, the window 5-7, then
    # the queries' own keys 8.. — positions not equal to the key index.
    "rolling-keys": lambda B, T: AttentionMask(
        (8 + torch.arange(T))[None], torch.cat([torch.tensor([-1, 0, 1, 5, 6, 7]), 8 + torch.arange(T - 6)])[None],
        k_valid=torch.cat([torch.tensor([False]), torch.ones(T - 1, dtype=torch.bool)])[None], window=4, sinks=2),
    # Block-sparse layouts (the rule itself is checked against a loop in test_block_sparse.py).
    "block-sparse": lambda B, T: AttentionMask(torch.arange(T)[None], torch.arange(T)[None],
                                               sparse=BlockSparse(block=2, local=2, global_blocks=1, stride=3)),
    "padded-block-sparse-window": lambda B, T: _padded_mask(B, T, left=True, causal=True, window=7,
                                                            sparse=BlockSparse(block=3, local=1, stride=2)),
}


def _padded_mask(B, T, left, causal, window=None, sparse=None):
    m = _padding(B, T, left=left)
    pos = positions_from_attention_mask(m)
    return AttentionMask(pos, pos, q_valid=m, k_valid=m, causal=causal, window=window, sparse=sparse)


def _allowed(mask, B, Tq, Tk):
    if mask is None:
        return torch.ones(B, Tq, Tk, dtype=torch.bool)
    return mask.dense().expand(B, 1, Tq, Tk)[:, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_backends_match_float64_loop(backend, heads, case):
    B, T, D = 3, 11, 16
    q, k, v = _qkv(B, heads[0], heads[1], T, T, D)
    mask = CASES[case](B, T)
    out = attention(q, k, v, mask, backend=backend)
    ref = naive_attention_f64(q, k, v, _allowed(mask, B, T, T))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_backend_gradients_match_float64_loop(backend, heads, case):
    B, T, D = 2, 13, 16
    q, k, v = _qkv(B, heads[0], heads[1], T, T, D, seed=5)
    mask = CASES[case](B, T)
    g = torch.randn(B, heads[0], T, D, generator=torch.Generator().manual_seed(9))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    grads = torch.autograd.grad(attention(*leaves, mask, backend=backend), leaves, g)
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = torch.autograd.grad(naive_attention_f64(*leaves64, _allowed(mask, B, T, T)), leaves64, g.double())
    for name, got, want in zip("qkv", grads, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_tolerance(backend, dtype):
    B, T, D = 2, 19, 16
    q, k, v = _qkv(B, 8, 2, T, T, D, seed=7)
    mask = CASES["left-padded-causal"](B, T)
    ref = naive_attention_f64(q, k, v, _allowed(mask, B, T, T))
    out = attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, backend=backend)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_prefill_head_dims_64_and_128(D, causal):
    B, T = 1, 70                                   # not a multiple of the 64-row tiles
    q, k, v = _qkv(B, 4, 2, T, T, D, seed=D)
    mask = CASES["causal" if causal else "non-causal"](B, T)
    ref = naive_attention_f64(q, k, v, _allowed(mask, B, T, T))
    torch.testing.assert_close(attention(q, k, v, mask, backend="triton").double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_with_per_row_lengths(heads, dtype):
    from kvlab.attention.kernels.triton_backend import triton_decode

    B, S, D = 3, 150, 32
    lengths = torch.tensor([150, 1, 77])
    q, k, v = _qkv(B, heads[0], heads[1], 1, S, D, seed=3)
    allowed = (torch.arange(S)[None] < lengths[:, None])[:, None, :]
    ref = naive_attention_f64(q, k, v, allowed)
    out = triton_decode(q.to(dtype), k.to(dtype), v.to(dtype), lengths)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_triton_backend_errors():
    q, k, v = _qkv(1, 2, 1, 3, 3, 24)
    with pytest.raises(ConfigError, match="head_dim a power of two in \\[16, 256\\], got 24"):
        attention(q, k, v, backend="triton")


def test_reference_in_float64_is_exact_to_float64_loop():
    q, k, v = _qkv(2, 4, 2, 5, 7, 8, dtype=torch.float64)
    mask = AttentionMask(torch.tensor([[2, 3, 4, 5, 6]]), torch.arange(7)[None])
    ref = naive_attention_f64(q, k, v, _allowed(mask, 2, 5, 7))
    torch.testing.assert_close(attention(q, k, v, mask, backend="reference"), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_nothing_to_attend_are_zero_not_nan(backend):
    q, k, v = _qkv(2, 4, 2, 5, 5, 16)
    for t in (q, k, v):
        t.requires_grad_(True)
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = positions_from_attention_mask(valid)
    mask = AttentionMask(pos, pos, q_valid=valid, k_valid=valid)
    out = attention(q, k, v, mask, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[0, :, :2] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_may_attend_rule_with_sinks():
    # Window 2 and 2 sinks: the query at position 5 sees positions 0, 1 (sinks) and 4, 5 (window).
    m = may_attend(torch.tensor([[5]]), torch.arange(7)[None], window=2, sinks=2)
    assert m[0, 0, 0].tolist() == [True, True, False, False, True, True, False]


def test_may_attend_rule():
    # Query at position 3 with window 2 sees positions 2 and 3 only; padding key never seen.
    m = may_attend(torch.tensor([[3]]), torch.tensor([[0, 1, 2, 3, 4]]),
                   k_valid=torch.tensor([[1, 1, 1, 1, 1]]), window=2)
    assert m[0, 0, 0].tolist() == [False, False, True, True, False]
    m = may_attend(torch.tensor([[4]]), torch.tensor([[0, 1, 2, 3, 4]]), k_valid=torch.tensor([[1, 0, 1, 1, 1]]))
    assert m[0, 0, 0].tolist() == [True, False, True, True, True]
    m = may_attend(torch.tensor([[0]]), torch.tensor([[0, 1]]), causal=False)
    assert m[0, 0, 0].tolist() == [True, True]


def test_positions_count_real_tokens_for_left_and_right_padding():
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_attention_mask(m).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert positions_from_attention_mask(m, start=torch.tensor([4, 1])).tolist() == [[4, 4, 4, 5, 6], [1, 2, 3, 3, 3]]


@pytest.mark.parametrize("shapes, match", [
    (((1, 4, 3, 8), (1, 3, 3, 8), (1, 3, 3, 8)), "not divisible by n_kv_head=3"),
    (((1, 4, 3, 8), (1, 2, 3, 4), (1, 2, 3, 4)), "differ in batch or head_dim"),
    (((1, 4, 3, 8), (1, 2, 3, 8), (1, 2, 4, 8)), "must have the same shape"),
    (((4, 3, 8), (1, 2, 3, 8), (1, 2, 3, 8)), "4-D"),
])
def test_shape_errors_are_clear(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    for backend in BACKENDS:
        with pytest.raises(ConfigError, match=match):
            attention(q, k, v, backend=backend)


@settings(max_examples=30, deadline=None)
@given(Tq=st.integers(1, 40), Tk_extra=st.integers(0, 20), block_q=st.integers(1, 17), block_k=st.integers(1, 17),
       group=st.sampled_from([1, 3]), causal=st.booleans(), seed=st.integers(0, 999))
def test_property_flash_tiles_of_any_size(Tq, Tk_extra, block_q, block_k, group, causal, seed):
    """Lengths that are not tile multiples, tiles larger than the sequence, queries at an offset."""
    from kvlab.attention.kernels.flash import flash_attention

    Tk = Tq + Tk_extra
    q, k, v = _qkv(2, 2 * group, 2, Tq, Tk, 8, seed=seed, dtype=torch.float64)
    mask = AttentionMask((Tk_extra + torch.arange(Tq))[None], torch.arange(Tk)[None], causal=causal)
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = flash_attention(q, k, v, mask, block_q=block_q, block_k=block_k, return_lse=True)
    ref = attention(q, k, v, mask, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # The log-sum-exp is that of the masked, scaled scores.
    scores = (q.view(2, 2, group, Tq, 8) @ k.unsqueeze(2).transpose(-1, -2)) * 8 ** -0.5
    scores = scores.masked_fill(~mask.dense().unsqueeze(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).reshape(2, 2 * group, Tq), rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), n_kv=st.integers(1, 3), group=st.integers(1, 4), Tq=st.integers(1, 9),
       extra=st.integers(0, 6), D=st.sampled_from([16, 32]), window=st.one_of(st.none(), st.integers(1, 6)),
       seed=st.integers(0, 2**16))
def test_property_sdpa_matches_float64_with_cache_offsets(B, n_kv, group, Tq, extra, D, window, seed):
    """Queries at the end of a longer key sequence (a decode/chunk step), random key padding."""
    Tk = Tq + extra
    q, k, v = _qkv(B, n_kv * group, n_kv, Tq, Tk, D, seed=seed)
    g = torch.Generator().manual_seed(seed)
    k_valid = torch.rand(B, Tk, generator=g) > 0.2
    mask = AttentionMask((extra + torch.arange(Tq))[None], torch.arange(Tk)[None], k_valid=k_valid, window=window)
    ref = naive_attention_f64(q, k, v, _allowed(mask, B, Tq, Tk))
    for backend in BACKENDS:
        torch.testing.assert_close(attention(q, k, v, mask, backend=backend).double(), ref, rtol=1e-5, atol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_says_so(caplog):
    import logging

    from kvlab.attention.kernels.dispatch import auto_backend_name

    q, k, v = _qkv(1, 4, 2, 5, 5, 16)
    with caplog.at_level(logging.DEBUG, logger="kvlab.attention.kernels.dispatch"):
        out = attention(q, k, v, None, backend="auto")
    assert "auto -> sdpa" in caplog.text
    torch.testing.assert_close(out, attention(q, k, v, None, backend="sdpa"))
    assert auto_backend_name(q.to(torch.bfloat16)) == "sdpa"          # bf16 on a CPU: still not triton


def test_auto_would_pick_triton_for_half_precision_cuda_tensors():
    from kvlab.attention.kernels.dispatch import auto_backend_name

    q = torch.empty(1, 4, 5, 64, dtype=torch.bfloat16, device="meta")
    assert auto_backend_name(q) == "sdpa"                               # not CUDA
    fake = type("FakeCuda", (), {"device": torch.device("cuda"), "dtype": torch.bfloat16, "shape": (1, 4, 5, 64)})()
    assert auto_backend_name(fake) == "triton"
    fake.shape = (1, 4, 5, 90)
    assert auto_backend_name(fake) == "sdpa"                            # head_dim not a power of two
    fake.shape, fake.dtype = (1, 4, 5, 64), torch.float32
    assert auto_backend_name(fake) == "sdpa"                            # fp32: PyTorch's kernels


def _alibi_f64(q, k, v, allowed, q_pos, k_pos):
    """Float64 attention with ALiBi written out: head h adds m_h · (k_pos − q_pos), the paper's slopes
    m_h = 2^(−8(h+1)/H) for a power-of-two H (here 4 query heads)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Tq, D = q.shape
    group = Hq // k.shape[1]
    dist = (k_pos[:, None, :] - q_pos[:, :, None]).double().expand(B, Tq, -1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(group, 1)) / math.sqrt(D)
    scores = scores + torch.stack([2.0 ** (-8.0 * (h + 1) / Hq) * dist for h in range(Hq)], 1)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(scores, -1))
    return p @ v.repeat_interleave(group, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["causal", "left-padded-causal", "window-sinks", "rolling-keys"])
def test_alibi_in_every_backend_forward_and_gradients(backend, case):
    from kvlab.attention.bias import AlibiBias

    B, T, D = 2, 12, 16
    q, k, v = _qkv(B, 4, 2, T, T, D, seed=7)
    mask = CASES[case](B, T)
    allowed = _allowed(mask, B, T, T)
    ref = _alibi_f64(q, k, v, allowed, mask.q_pos.expand(B, -1), mask.k_pos.expand(B, -1))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, mask, backend=backend, bias=AlibiBias(4))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(B, 4, T, D, generator=torch.Generator().manual_seed(1))
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref64 = _alibi_f64(*leaves64, allowed, mask.q_pos.expand(B, -1), mask.k_pos.expand(B, -1))
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref64, leaves64, g.double())):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_alibi_slopes_follow_the_paper_for_any_head_count():
    from kvlab.attention.bias import alibi_slopes

    assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...).
    twelve = alibi_slopes(12).tolist()
    assert twelve[:8] == alibi_slopes(8).tolist()
    assert twelve[8:] == pytest.approx([2.0 ** -(0.5 + i) for i in range(4)])

"""The backend interface beyond a boolean mask: additive score biases (tensor or positional),
value widths that differ from key widths, per-row lengths from the cache, and backends that say
what they cannot serve while ``auto`` picks one that can."""

import math

import pytest
import torch

from kvlab.attention import AttentionMask, ScoreBias, attention
from kvlab.attention.kernels.dispatch import auto_backend_name
from kvlab.errors import ConfigError

BACKENDS = ["reference", "sdpa", "flash"]


class Alibi(ScoreBias):
    """ALiBi (Press et al. 2022): ``-slope_h · (q_pos - k_pos)``, slopes 2^(-8h/H)."""

    def __init__(self, n_head: int, trainable: bool = False):
        super().__init__()
        slopes = torch.tensor([2 ** (-8 * (h + 1) / n_head) for h in range(n_head)])
        self.slopes = torch.nn.Parameter(slopes, requires_grad=trainable)

    def forward(self, q_pos, k_pos):
        dist = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).float()           # (B|1, Tq, Tk)
        return -self.slopes.view(1, -1, 1, 1) * dist.unsqueeze(1)


def naive_f64(q, k, v, allowed, bias=None):
    """Row by row, head by head, in float64: softmax(q·k/sqrt(Dk) + bias) over allowed keys, times v."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Tq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, Tq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for t in range(Tq):
                keys = allowed[b, t].nonzero().flatten()
                if len(keys):
                    s = k[b, h // G, keys] @ q[b, h, t] / math.sqrt(D)
                    if bias is not None:
                        s = s + bias[min(b, bias.shape[0] - 1), min(h, bias.shape[1] - 1), t, keys].double()
                    out[b, h, t] = torch.softmax(s, 0) @ v[b, h // G, keys]
    return out


def _inputs(B=2, Hq=4, Hkv=2, Tq=7, Tk=7, Dk=8, Dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Tq, Dk, generator=g), torch.randn(B, Hkv, Tk, Dk, generator=g),
            torch.randn(B, Hkv, Tk, Dv, generator=g))


def _causal(B, T, window=None):
    pos = torch.arange(T).unsqueeze(0)
    return AttentionMask(pos, pos, window=window, plain_causal=window is None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 3])
def test_positional_bias_matches_float64(backend, window):
    q, k, v = _inputs()
    mask = _causal(2, 7, window)
    alibi = Alibi(4)
    dense = alibi(mask.q_pos, mask.k_pos)
    expected = naive_f64(q, k, v, mask.dense()[:, 0].expand(2, -1, -1), dense)
    got = attention(q, k, v, mask, backend=backend, bias=alibi)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, attention(q, k, v, mask, backend=backend), atol=1e-3)   # the bias matters


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_bias_per_batch_and_head_matches_float64(backend):
    q, k, v = _inputs(Tq=3, Tk=9)
    bias = torch.randn(2, 4, 3, 9, generator=torch.Generator().manual_seed(5))
    pos_q, pos_k = torch.arange(6, 9).unsqueeze(0), torch.arange(9).unsqueeze(0)
    mask = AttentionMask(pos_q, pos_k)
    expected = naive_f64(q, k, v, mask.dense()[:, 0].expand(2, -1, -1), bias)
    got = attention(q, k, v, mask, backend=backend, bias=bias)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Dv", [4, 24])
def test_value_width_may_differ_from_key_width(backend, Dv):
    q, k, v = _inputs(Dk=16, Dv=Dv)
    mask = _causal(2, 7)
    expected = naive_f64(q, k, v, mask.dense()[:, 0].expand(2, -1, -1))
    got = attention(q, k, v, mask, backend=backend)
    assert got.shape == (2, 4, 7, Dv)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flash"])
def test_gradients_with_bias_and_narrow_values_match_float64(backend):
    q, k, v = (t.double().requires_grad_() for t in _inputs(Dk=8, Dv=4))
    mask = _causal(2, 7)
    bias = torch.randn(1, 4, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    attention(q, k, v, mask, backend="reference", bias=bias).pow(2).sum().backward()
    ref = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention(q, k, v, mask, backend=backend, bias=bias).pow(2).sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flash"])
@pytest.mark.parametrize("window", [None, 3])
def test_a_trainable_bias_gets_the_float64_gradient(backend, window):
    """A ScoreBias with parameters and a tensor bias that requires grad: their gradients (flash:
    accumulated tile by tile, with tiles smaller than the sequence) equal autograd through the
    float64 loop."""
    from kvlab.attention.kernels.flash import flash_attention

    q, k, v = (t.double().requires_grad_() for t in _inputs())
    mask = _causal(2, 7, window)
    alibi = Alibi(4, trainable=True).double()
    tensor_bias = torch.randn(2, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                              requires_grad=True)
    g = torch.randn(2, 4, 7, v.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for bias, leaf in ((alibi, alibi.slopes), (tensor_bias, tensor_bias)):
        dense = bias(mask.q_pos, mask.k_pos) if bias is alibi else bias
        want = torch.autograd.grad(naive_f64(q, k, v, mask.dense()[:, 0].expand(2, -1, -1), dense), (q, k, v, leaf), g)
        out = (flash_attention(q, k, v, mask, block_q=3, block_k=2, bias=bias) if backend == "flash"
               else attention(q, k, v, mask, backend=backend, bias=bias))
        got = torch.autograd.grad(out, (q, k, v, leaf), g)
        assert got[3].abs().sum() > 0
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_triton_declines_what_its_kernels_lack_and_auto_picks_a_capable_backend():
    q, k, v = _inputs(Dk=16, Dv=16)
    mask = _causal(2, 7)
    with pytest.raises(ConfigError, match="'triton' cannot serve this call: the triton kernels add no score bias"):
        attention(q, k, v, mask, backend="triton", bias=Alibi(4))
    with pytest.raises(ConfigError, match="value width = key width"):
        attention(q, k, v[..., :8], mask, backend="triton")
    assert auto_backend_name(q, k, v, mask, Alibi(4)) == "sdpa"
    torch.testing.assert_close(attention(q, k, v, mask, backend="auto", bias=Alibi(4)),
                               attention(q, k, v, mask, backend="reference", bias=Alibi(4)), rtol=1e-5, atol=1e-5)


def test_a_positional_bias_without_a_mask_is_refused():
    q, k, v = _inputs()
    with pytest.raises(ConfigError, match="positional score bias needs an AttentionMask"):
        attention(q, k, v, None, backend="sdpa", bias=Alibi(4))


def test_the_cache_hands_per_row_lengths_to_the_kernels():
    from conftest import make_model

    model = make_model(n_kv_head=2)
    cache = model.new_cache(2, 12)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    model(torch.ones(2, 5, dtype=torch.long), attention_mask=mask, cache=cache)
    step = cache.prepare(1)
    assert step.new_lengths.tolist() == [4, 6]
    from kvlab.attention.kernels.common import prefix_lengths

    pos = step.q_pos
    m = AttentionMask(pos, torch.arange(step.k_len).unsqueeze(0), k_valid=step.k_valid, k_lengths=step.new_lengths)
    assert prefix_lengths(m, 2, step.k_len).tolist() == [4, 6]
    m.k_lengths = None                       # derived from the dense mask instead: the same lengths
    assert prefix_lengths(m, 2, step.k_len).tolist() == [4, 6]

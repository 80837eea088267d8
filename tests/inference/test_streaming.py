"""StreamingLLM: attention sinks seen at their places in the cache, and any model run with a window
at inference — against StreamingLLM's own definition (a cache of sinks then the window, positions
re-numbered inside it) computed in float64."""

import math

import pytest
import torch

from kvlab import ConfigError
from kvlab.attention.kernels import attention
from kvlab.attention.masks import AttentionMask
from kvlab.attention.sinks import sinks_at_cache_positions
from kvlab.inference.generation import generate
from kvlab.inference.streaming import with_window
from kvlab.layers.rope import apply_rope, rope_cos_sin, rope_inv_freq

from conftest import make_model


def _rotate(x, positions, theta=10000.0):
    """RoPE of x (H, D) at integer positions (H,) or a scalar, float64, from the definition."""
    D = x.shape[-1]
    out = x.clone()
    for j in range(D // 2):
        ang = torch.as_tensor(positions, dtype=torch.float64) * theta ** (-2.0 * j / D)
        a, b = x[..., j], x[..., j + D // 2]
        c, s = torch.cos(ang), torch.sin(ang)
        out[..., j], out[..., j + D // 2] = a * c - b * s, b * c + a * s
    return out


def _streaming_llm(q_raw, k_raw, v, sinks, window):
    """Per query i: the cache holds positions [0, S) and (i - W, i]; each entry's position is its
    index in that cache (StreamingLLM, section 3.2); attention over it in float64."""
    T, D = q_raw.shape[0], q_raw.shape[-1]
    out = []
    for i in range(T):
        kept = sorted(set(range(min(sinks, i + 1))) | set(range(max(0, i - window + 1), i + 1)))
        places = torch.arange(len(kept), dtype=torch.float64)
        q = _rotate(q_raw[i], float(places[-1]))                      # the query is the newest entry
        k = torch.stack([_rotate(k_raw[j], float(p)) for j, p in zip(kept, places)])
        scores = (k @ q) / math.sqrt(D)
        out.append(torch.softmax(scores, 0) @ v[kept])
    return torch.stack(out)


@pytest.mark.parametrize("sinks,window", [(1, 3), (2, 4), (4, 2)])
def test_both_forms_equal_streaming_llms_cache_positions(sinks, window):
    g = torch.Generator().manual_seed(sinks * 10 + window)
    T, D = 13, 8
    q_raw, k_raw, v = (torch.randn(T, D, generator=g, dtype=torch.float64) for _ in range(3))
    expected = _streaming_llm(q_raw, k_raw, v, sinks, window)

    inv = rope_inv_freq(D, 10000.0).double()
    pos = torch.arange(T)[None]
    cos, sin = rope_cos_sin(pos, inv, torch.float64)
    q_un = q_raw[None, None]
    q, k = apply_rope(q_un, cos, sin), apply_rope(k_raw[None, None], cos, sin)
    mask = AttentionMask(pos, pos, window=window, sinks=sinks)
    # Several queries at once (training, prefill): the widened form.
    qa, ka = sinks_at_cache_positions(q_un, q, k, pos, pos, sinks=sinks, window=window, inv_freq=inv)
    assert qa.shape[-1] == 2 * D
    full = attention(qa, ka, v[None, None], mask, backend="reference", scale=D ** -0.5)[0, 0]
    torch.testing.assert_close(full, expected, rtol=1e-7, atol=1e-7)
    # One query at a time (decoding): its sinks' keys rotated forward.
    for i in range(T):
        qi = pos[:, i:i + 1]
        q1, k1 = sinks_at_cache_positions(q_un[:, :, i:i + 1], q[:, :, i:i + 1], k[:, :, :i + 1], qi,
                                          pos[:, :i + 1], sinks=sinks, window=window, inv_freq=inv)
        m1 = AttentionMask(qi, pos[:, :i + 1], window=window, sinks=sinks)
        one = attention(q1, k1, v[None, None, :i + 1], m1, backend="reference", scale=D ** -0.5)[0, 0, 0]
        torch.testing.assert_close(one, expected[i], rtol=1e-7, atol=1e-7)


def test_original_positions_differ_from_cache_positions_past_the_first_window():
    # The rule matters: with sinks at their original positions a late query sees them further away.
    model = make_model(n_kv_head=2, sliding_window=3, attention_sinks=2, sink_positions="original").double()
    cached = with_window(make_model(n_kv_head=2).double(), 3, 2, "cache")
    with_orig = with_window(make_model(n_kv_head=2).double(), 3, 2, "original")
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    a, b = cached(tokens), with_orig(tokens)
    torch.testing.assert_close(a[:, :5], b[:, :5])                 # up to S + W - 1 the two agree
    assert (a[:, 5:] - b[:, 5:]).abs().amax() > 1e-4
    torch.testing.assert_close(b, model(tokens))                    # the same weights, the same wiring


@torch.no_grad()
def test_with_window_keeps_the_weights_and_bounds_the_cache():
    base = make_model(n_kv_head=2, max_seq_len=16)
    streamed = with_window(base, 4, 2)
    assert streamed.cfg.sliding_window == 4 and streamed.cfg.sink_positions == "cache"
    assert base.cfg.sliding_window is None                          # the original is unchanged
    short = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(streamed(short), base(short))        # inside the window: the same model
    # 4x the training length, greedy, in the memory of sinks + window entries per producer layer.
    out = generate(streamed, [[1, 2, 3]], max_new_tokens=64, stop_tokens=[])
    assert len(out[0]) == 64
    assert streamed.new_cache(1, 67).nbytes == streamed.new_cache(1, 10_000).nbytes == (
        4 * 2 * 2 * 16 * 4 * (2 + 4))                               # layers x K,V x heads x dim x fp32 x slots
    assert streamed.cfg.positional_reach() == 5 and not streamed.cfg.extrapolates(10_000)
    assert base.cfg.extrapolates(17) and not base.cfg.extrapolates(16)


def test_with_window_refusals():
    with pytest.raises(ConfigError, match="sink_positions='cache'"):
        with_window(make_model(pos="alibi"), 4, 2, "cache")
    assert with_window(make_model(pos="alibi"), 4, 2).cfg.sink_positions == "original"
    with pytest.raises(ConfigError, match="windows of their own"):
        with_window(make_model(attention_layers=[{"kind": "gqa", "window": 3}, "gqa", "gqa", "gqa"]), 4)
    with pytest.raises(ConfigError, match="window=0"):
        with_window(make_model(), 0)
    with pytest.raises(ConfigError, match="mla layer keeps its sinks"):
        make_model(attn_kind="mla", attn_options=dict(kv_lora_rank=16), sliding_window=4, attention_sinks=1,
                   sink_positions="cache")

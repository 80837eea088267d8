"""The ``linear`` kind beyond the generic contract: the chunked form against the recurrence across
chunk boundaries, long sequences against the float64 reference model, a constant-size cache,
ragged rows, and its option errors."""

import pytest
import torch

from kvlab import ConfigError, ModelConfig, cache_bytes
from kvlab.attention.linear import chunked_linear_attention, retnet_log_decay

from conftest import make_model
from naive import naive_sequence_logits

HEDGEHOG = dict(n_kv_head=2, attention_layers=[{"kind": "linear", "feature": "hedgehog", "decay": "retnet"},
                                               {"kind": "linear"}, "gqa", {"kind": "linear", "decay": "retnet"}])


def _recurrence(fq, fk, v, log_decay):
    """The definition, one token at a time, in float64."""
    B, H, G, T, F = fq.shape
    S = torch.zeros(B, H, F, v.shape[-1], dtype=torch.float64)
    z = torch.zeros(B, H, F, dtype=torch.float64)
    out = torch.zeros(B, H, G, T, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        g = log_decay[..., t].exp()
        S = g[..., None, None] * S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = g[..., None] * z + fk[:, :, t]
        num = torch.einsum("bhgf,bhfd->bhgd", fq[..., t, :], S)
        den = torch.einsum("bhgf,bhf->bhg", fq[..., t, :], z)
        out[..., t, :] = num / (den[..., None] + 1e-6)
    return out, S, z


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunks_of_any_size_equal_the_recurrence(chunk):
    g = torch.Generator().manual_seed(0)
    B, H, G, T, F, Dv = 2, 2, 2, 21, 8, 5
    fq = torch.rand(B, H, G, T, F, generator=g, dtype=torch.float64)
    fk = torch.rand(B, H, T, F, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    log_decay = retnet_log_decay(H).double().view(1, H, 1).expand(B, H, T).clone()
    log_decay[1, :, :4] = 0.0                               # row 1 starts with padding: no decay there
    fk[1, :, :4] = 0.0
    want = _recurrence(fq, fk, v, log_decay)
    got = chunked_linear_attention(fq, fk, v, log_decay, torch.zeros(B, H, F, Dv, dtype=torch.float64),
                                   torch.zeros(B, H, F, dtype=torch.float64), chunk=chunk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_long_sequence_over_several_chunks_matches_the_float64_model():
    model = make_model(**HEDGEHOG)
    seq = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(1))
    ref = naive_sequence_logits(model, seq)
    torch.testing.assert_close(model(seq[None])[0].double(), ref, rtol=1e-4, atol=1e-4)


def test_the_state_is_the_same_size_after_any_number_of_tokens():
    model = make_model(attn_kind="linear")
    assert model.new_cache(2, 8).nbytes == model.new_cache(2, 100_000).nbytes
    cost = cache_bytes(model.cfg, "bf16")
    # 4 layers x 2 KV heads x (16 x 16 state + 16 normaliser) x 4 bytes (float32 states), written out.
    assert cost.per_token == 0 and cost.per_sequence == 4 * 2 * (16 * 16 + 16) * 4
    assert model.cfg.kv_bytes_per_token("bf16") == 0


def test_ragged_rows_decode_like_each_row_alone():
    model = make_model(**HEDGEHOG)
    long, short = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 4))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :5] = 0
    cache = model.new_cache(2, 20)
    first = model(batch, attention_mask=mask, cache=cache)[:, -1:]
    more = torch.randint(0, 256, (2, 6))
    got = torch.cat([first, *[model(more[:, t:t + 1], cache=cache) for t in range(6)]], 1)
    for row, prompt in ((0, long), (1, short)):
        alone = model(torch.cat([prompt, more[row:row + 1]], 1))
        torch.testing.assert_close(got[row], alone[0, prompt.shape[1] - 1:], rtol=1e-5, atol=1e-5)


def test_linear_options_are_checked():
    tiny = dict(n_kv_head=2)
    with pytest.raises(ConfigError, match="feature='relu' is not one of"):
        ModelConfig.from_preset("tiny", **tiny, attention_layers=[{"kind": "linear", "feature": "relu"}] * 4)
    with pytest.raises(ConfigError, match="linear attention has no window"):
        ModelConfig.from_preset("tiny", attn_kind="linear", sliding_window=4)
    with pytest.raises(ConfigError, match="cannot share KV across layers"):
        ModelConfig.from_preset("tiny", attn_kind="linear", cla=2)
    with pytest.raises(ConfigError, match="packed rows"):
        make_model(attn_kind="linear")(torch.ones(1, 4, dtype=torch.long), segment_ids=torch.tensor([[1, 1, 2, 2]]))


def _simple_gla_by_its_docstring(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, **kw):
    """flash-linear-attention's ``chunk_simple_gla`` as its documentation defines it, in a loop:
    ``[B, T, H, K]`` inputs, ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · q_tᵀ S_t``."""
    B, T, H, K = q.shape
    S = initial_state.clone() if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        S = g[:, t, :, None, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), (S if output_final_state else None)


def test_the_fla_path_computes_the_pytorch_chunked_form(monkeypatch):
    """The wrapper around flash-linear-attention (ones channel for z, copies per query head, layouts)
    against the PyTorch form, with the kernel replaced by its documented definition (the kernel
    itself needs a GPU: test_fla_kernel_on_gpu)."""
    import sys
    import types

    from kvlab.attention.linear import fla_linear_attention

    fake = types.ModuleType("fla.ops.simple_gla")
    fake.chunk_simple_gla = _simple_gla_by_its_docstring
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", fake)
    g = torch.Generator().manual_seed(0)
    B, H, T, F, Dv = 2, 2, 11, 5, 3
    fq = torch.rand(B, H, 1, T, F, generator=g, dtype=torch.float64)
    fk, v = torch.rand(B, H, T, F, generator=g, dtype=torch.float64), torch.randn(B, H, T, Dv, generator=g,
                                                                                  dtype=torch.float64)
    log_decay = -torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.2
    log_decay[0, :, :3] = 0                                              # padding: no decay
    S0, z0 = torch.rand(B, H, F, Dv, generator=g, dtype=torch.float64), torch.rand(B, H, F, generator=g,
                                                                                   dtype=torch.float64)
    want = chunked_linear_attention(fq, fk, v, log_decay, S0, z0, chunk=4)
    got = fla_linear_attention(fq, fk, v, log_decay, S0, z0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_fla_path_is_only_taken_on_cuda_with_a_kernel_backend():
    from kvlab.attention.linear import fla_available

    assert not fla_available(torch.zeros(1), "auto") and not fla_available(torch.zeros(1), "triton")
    if torch.cuda.is_available():
        cuda = torch.zeros(1, device="cuda")
        assert not fla_available(cuda, "reference") and not fla_available(cuda, "auto", group=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_kernel_on_gpu(dtype, monkeypatch):
    """A linear-attention model on the GPU: backend auto (flash-linear-attention's kernel) against
    the PyTorch chunked form, forward and gradients, and decoding after an fla prefill."""
    pytest.importorskip("fla")
    import kvlab.attention.linear as linear

    calls = []
    real = linear.fla_linear_attention
    monkeypatch.setattr(linear, "fla_linear_attention", lambda *a: calls.append(1) or real(*a))
    model = make_model(**dict(HEDGEHOG, n_kv_head=4)).to("cuda", dtype)          # G == 1: the fla path
    tokens = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(tokens)
    mask[0, :17] = 0                                                     # a left-padded row
    outs = {}
    for backend in ("auto", "reference"):
        model.zero_grad()
        logits = model(tokens, attention_mask=mask, backend=backend)
        logits.float().square().mean().backward()
        outs[backend] = (logits.float(), model.layers[0].self_attn.k_proj.weight.grad.float().clone())
    assert len(calls) == 3                                                 # the three linear layers, once
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    for a, b in zip(outs["auto"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    with torch.no_grad():
        cache = model.new_cache(2, 160)
        model(tokens, attention_mask=mask, cache=cache, backend="auto")
        step = model(tokens[:, -1:], cache=cache, backend="auto")
        full = model(torch.cat([tokens, tokens[:, -1:]], 1), attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                     backend="reference")
    torch.testing.assert_close(step[:, -1].float(), full[:, -1].float(), rtol=tol, atol=tol)

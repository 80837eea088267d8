"""The Triton kernels compiled for a real GPU (skipped without CUDA; the CPU suite runs the same
kernels under TRITON_INTERPRET=1 in test_attention.py).

Reference: the ``reference`` backend in float64 on the CPU — test_attention.py shows it equals the
float64 loop within 1e-12; the loop itself is too slow for these sizes."""

import pytest
import torch
from test_kernels import CASES

from kvlab.attention import AttentionMask, attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# tl.dot on fp32 inputs uses TF32 on GPUs (10-bit mantissa, as fp16): fp32 gets fp16's tolerance.
TOL = {torch.float32: 1e-2, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def reference_f64(q, k, v, mask):
    return attention(q, k, v, mask, backend="reference")


def _qkv_cuda(B, Hq, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, t, D, generator=g).to("cuda", dtype) for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T, D", [(70, 64), (200, 128)])
def test_triton_prefill_forward_and_backward_on_gpu(dtype, heads, case, T, D):
    B = 3
    q, k, v = _qkv_cuda(B, heads[0], heads[1], T, T, D, dtype, seed=T + D)
    mask = CASES[case](B, T)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, mask, backend="triton")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    grads = torch.autograd.grad(out, leaves, g)
    leaves64 = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference_f64(*leaves64, mask)
    ref_grads = torch.autograd.grad(ref, leaves64, g.cpu().double())
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)
    for name, got, want in zip("qkv", grads, ref_grads):
        # Gradients sum over up to T keys: scale the tolerance with their magnitude.
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * scale, msg=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 4), (32, 8), (8, 1)], ids=["mha", "gqa", "mqa"])
def test_triton_decode_on_gpu_with_per_row_lengths(dtype, heads):
    from kvlab.attention.kernels.triton_backend import triton_decode

    B, S, D = 4, 3000, 128
    lengths = torch.tensor([3000, 1, 777, 2048])
    q, k, v = _qkv_cuda(B, heads[0], heads[1], 1, S, D, dtype, seed=11)
    k_valid = torch.arange(S)[None] < lengths[:, None]
    mask = AttentionMask(lengths[:, None] - 1, torch.arange(S)[None], k_valid=k_valid, causal=False)
    ref = reference_f64(q.cpu().double(), k.cpu().double(), v.cpu().double(), mask)
    out = triton_decode(q, k, v, lengths.to("cuda"))
    torch.testing.assert_close(out.cpu().double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("variant", [dict(n_kv_head=4), dict(n_kv_head=1, cla=2), dict(n_kv_head=2)])
def test_model_with_triton_backend_on_gpu_matches_cpu_reference(variant):
    """Full forward, prefill + decode through the cache, bf16 on the GPU vs float64 on the CPU."""
    from kvlab import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", d_model=256, n_head=4, **variant)     # head_dim 64
    ref_model = Transformer(cfg).double().eval()
    gpu = Transformer(cfg).eval()
    gpu.load_state_dict(ref_model.state_dict())
    gpu = gpu.to("cuda", torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref_model(ids, backend="reference")
        full = gpu(ids.cuda(), backend="triton")
        cache = gpu.new_cache(batch_size=2, max_len=100)
        gpu(ids[:, :80].cuda(), cache=cache, backend="triton")
        steps = [gpu(ids[:, t:t + 1].cuda(), cache=cache, backend="triton") for t in range(80, 90)]
    torch.testing.assert_close(full.float().cpu().double(), want, rtol=0.05, atol=0.05)
    torch.testing.assert_close(torch.cat(steps, 1).float().cpu().double(), want[:, 80:], rtol=0.05, atol=0.05)

"""Triton kernels vs PyTorch SDPA on an NVIDIA GPU, in one run (one command):

- prefill: TFLOP/s of the Triton FlashAttention-2 forward and backward vs
  ``scaled_dot_product_attention`` restricted to its FLASH_ATTENTION backend, head_dim 64 and 128,
  causal and not, N = 1k…16k (batch chosen for 16k tokens per call), GQA 32/8 and MHA 32/32, bf16;
- decode: achieved bandwidth (KV bytes read / time) of the Triton split-KV decode kernel vs SDPA for
  one query per row, batch 1…64, context 1k…32k, GQA 32/8, head_dim 128, bf16, against the
  bandwidth a device-to-device copy of the same bytes reaches.

FLOPs: forward 4·B·Hq·N²·D (halved when causal), backward 2.5× forward (FlashAttention-2's count).
Timing: ``triton.testing.do_bench`` (medians, L2 flushed between runs).

    python benchmarks/attention_gpu.py                 # on a GPU machine; writes results/attention_gpu.json
    TRITON_INTERPRET=1 python benchmarks/attention_gpu.py --smoke   # tiny shapes on a CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvlab.attention import AttentionMask
from kvlab.attention.kernels.triton_backend import triton_decode, triton_prefill


def bench(fn, smoke: bool) -> float:
    """Median milliseconds."""
    if smoke:
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sdpa_flash(q, k, v, causal):
    """SDPA with only the FLASH_ATTENTION kernel allowed. K/V are expanded when that kernel
    rejects enable_gqa (the result says so) — a cost the baseline then carries."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), False
        except RuntimeError:
            g = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                  is_causal=causal), True


def prefill_rows(device, dtype, smoke):
    rows = []
    lengths = (64, 128) if smoke else (1024, 2048, 4096, 8192, 16384)
    dims = (64,) if smoke else (64, 128)
    heads = ((4, 2),) if smoke else ((32, 8), (32, 32))
    tokens = 128 if smoke else 16384
    for D in dims:
        for Hq, Hkv in heads:
            for causal in (True, False):
                for N in lengths:
                    B = max(1, tokens // N)
                    q = torch.randn(B, Hq, N, D, device=device, dtype=dtype, requires_grad=True)
                    k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=True)
                    v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=True)
                    pos = torch.arange(N, device=device)[None]
                    mask = AttentionMask(pos, pos, plain_causal=True) if causal else None
                    flops = 4 * B * Hq * N * N * D / (2 if causal else 1)
                    do = torch.randn_like(q)
                    out_t = triton_prefill(q, k, v, mask)
                    out_s, expanded = sdpa_flash(q, k, v, causal)
                    row = {"D": D, "Hq": Hq, "Hkv": Hkv, "causal": causal, "N": N, "B": B,
                           "sdpa_expanded_kv": expanded,
                           "max_abs_diff": float((out_t.float() - out_s.float()).abs().max())}
                    t_fwd = bench(lambda: triton_prefill(q, k, v, mask), smoke)
                    s_fwd = bench(lambda: sdpa_flash(q, k, v, causal), smoke)
                    t_bwd = bench(lambda: torch.autograd.grad(out_t, (q, k, v), do, retain_graph=True), smoke)
                    s_bwd = bench(lambda: torch.autograd.grad(out_s, (q, k, v), do, retain_graph=True), smoke)
                    row.update(triton_fwd_tflops=flops / t_fwd / 1e9, sdpa_fwd_tflops=flops / s_fwd / 1e9,
                               triton_bwd_tflops=2.5 * flops / t_bwd / 1e9, sdpa_bwd_tflops=2.5 * flops / s_bwd / 1e9)
                    row["fwd_ratio"] = row["triton_fwd_tflops"] / row["sdpa_fwd_tflops"]
                    row["bwd_ratio"] = row["triton_bwd_tflops"] / row["sdpa_bwd_tflops"]
                    rows.append(row)
                    print(row, flush=True)
    return rows


def decode_rows(device, dtype, smoke):
    rows = []
    Hq, Hkv, D = (4, 2, 64) if smoke else (32, 8, 128)
    for B in ((1, 2) if smoke else (1, 4, 16, 64)):
        for S in ((100, 300) if smoke else (1024, 4096, 16384, 32768)):
            q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype)
            k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
            v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
            lengths = torch.full((B,), S, device=device, dtype=torch.int32)
            kv_bytes = 2 * k.numel() * k.element_size()
            out_t = triton_decode(q, k, v, lengths)
            out_s = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            t = bench(lambda: triton_decode(q, k, v, lengths), smoke)
            s = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), smoke)
            src = torch.empty(kv_bytes // 2, device=device, dtype=torch.bfloat16)
            dst = torch.empty_like(src)
            c = bench(lambda: dst.copy_(src), smoke)
            row = {"B": B, "context": S, "kv_MB": kv_bytes / 1e6,
                   "max_abs_diff": float((out_t.float() - out_s.float()).abs().max()),
                   "triton_GBps": kv_bytes / t / 1e6, "sdpa_GBps": kv_bytes / s / 1e6,
                   "copy_GBps": 2 * kv_bytes / c / 1e6}           # a copy reads and writes
            row["triton_vs_copy"] = row["triton_GBps"] / row["copy_GBps"]
            row["triton_vs_sdpa"] = row["triton_GBps"] / row["sdpa_GBps"]
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU + TRITON_INTERPRET=1 works)")
    ap.add_argument("--out", default="benchmarks/results/attention_gpu.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --smoke with TRITON_INTERPRET=1")
    dtype = torch.bfloat16 if not args.smoke else torch.float16
    import triton

    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
            "dtype": str(dtype), "smoke": args.smoke}
    result = {"meta": meta, "prefill": prefill_rows(device, dtype, args.smoke),
              "decode": decode_rows(device, dtype, args.smoke)}
    out = Path(args.out if not args.smoke else "/tmp/attention_gpu_smoke.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    if not args.smoke:
        fwd = [r["fwd_ratio"] for r in result["prefill"]]
        dec = [r["triton_vs_copy"] for r in result["decode"]]
        print(f"prefill forward triton/sdpa: min {min(fwd):.2f}, "
              f"geomean {math.exp(sum(map(math.log, fwd)) / len(fwd)):.2f} "
              f"(target >= 0.9); decode bandwidth / copy: min {min(dec):.2f}, max {max(dec):.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()

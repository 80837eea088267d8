"""Decode-step time of the attention backends on a GQA model at a long context.

One decode step = one new token per row against a KV cache already holding `--context` tokens.
Measured side by side in one run: the whole model step (kvlab.eval.bench.measure_decode, median of
`--steps`) and the attention call alone, for each backend; plus, for the attention call only, the naive
baseline that repeats K/V per query head
before SDPA (what kvlab never does) to show what grouping saves.

    python benchmarks/decode_backends.py --preset smollm2-135m --batch 16 --context 2048
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from kvlab import ModelConfig, Transformer
from kvlab.attention import attention
from kvlab.eval.bench import measure_decode


def timed(fn, min_run_time: float) -> float:
    """Median seconds per call (torch.utils.benchmark handles warm-up and threads)."""
    fn()
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timing per attention measurement")
    ap.add_argument("--steps", type=int, default=20, help="timed model decode steps (median reported)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    model = Transformer(cfg).to(dtype).eval()
    B, ctx = args.batch, args.context
    q = torch.randn(B, cfg.n_head, 1, cfg.head_dim, dtype=dtype)
    k = torch.randn(B, cfg.n_kv_head, ctx + 1, cfg.head_dim, dtype=dtype)
    v = torch.randn_like(k)
    group = cfg.n_head // cfg.n_kv_head

    def attn(backend):
        return lambda: attention(q, k, v, None, backend=backend)

    def repeat_then_sdpa():  # the baseline kvlab avoids: a G-times copy of K and V every step
        F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))

    results = {"preset": args.preset, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "batch": B,
               "context": ctx, "dtype": args.dtype, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    for backend in ("reference", "sdpa"):
        results[f"model_step_ms_{backend}"] = measure_decode(model, B, ctx, steps=args.steps, backend=backend).step_ms
        results[f"attention_ms_{backend}"] = 1e3 * timed(attn(backend), args.min_run_time)
    results["attention_ms_repeat_kv_sdpa"] = 1e3 * timed(repeat_then_sdpa, args.min_run_time)
    # What one attention call must read (each KV head once), against what a plain copy reaches.
    kv_bytes = 2 * k.numel() * k.element_size()
    for backend in ("reference", "sdpa"):
        results[f"attention_kv_read_GBps_{backend}"] = kv_bytes / (results[f"attention_ms_{backend}"] / 1e3) / 1e9
    src = torch.empty(kv_bytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), args.min_run_time)
    results["copy_GBps"] = 2 * src.numel() * 4 / copy_s / 1e9     # read + write
    results["model_step_ratio_reference_over_sdpa"] = results["model_step_ms_reference"] / results["model_step_ms_sdpa"]
    results["attention_ratio_reference_over_sdpa"] = results["attention_ms_reference"] / results["attention_ms_sdpa"]
    results["attention_ratio_repeat_over_sdpa"] = results["attention_ms_repeat_kv_sdpa"] / results["attention_ms_sdpa"]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.preset} ({cfg.n_head} q / {cfg.n_kv_head} kv heads), batch {B}, context {ctx}, {args.dtype}, "
          f"{results['threads']} threads, torch {torch.__version__}")
    print(f"{'':28}{'reference':>12}{'sdpa':>12}{'ref/sdpa':>10}")
    for what in ("model_step", "attention"):
        r, s = results[f"{what}_ms_reference"], results[f"{what}_ms_sdpa"]
        print(f"{what + ' (ms, one layer)' if what == 'attention' else what + ' (ms)':28}"
              f"{r:12.2f}{s:12.2f}{r / s:10.2f}")
    print(f"attention, repeat K/V then SDPA: {results['attention_ms_repeat_kv_sdpa']:.2f} ms "
          f"({results['attention_ratio_repeat_over_sdpa']:.1f}x the grouped sdpa call)")
    print(f"KV read rate of one attention call: reference {results['attention_kv_read_GBps_reference']:.1f} GB/s, "
          f"sdpa {results['attention_kv_read_GBps_sdpa']:.1f} GB/s; a copy of the same bytes "
          f"{results['copy_GBps']:.1f} GB/s (read + write)")


if __name__ == "__main__":
    main()

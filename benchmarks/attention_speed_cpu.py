"""CPU speed of the attention backends side by side in one run: ``flash`` (tiled PyTorch) and
``reference`` against ``sdpa`` (PyTorch's fused kernels), prefill forward, prefill forward +
backward, and decode (one query per row against a cache).

    python benchmarks/attention_speed_cpu.py [--min-run-time 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from kvlab.attention import AttentionMask, attention


def median_s(fn, min_run_time):
    fn()
    return Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-run-time", type=float, default=2.0)
    ap.add_argument("--out", default="benchmarks/results/attention_speed_cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    backends = ("sdpa", "flash", "reference")
    # Prefill: batch 1, 8 query heads / 2 KV heads, d 64, causal.
    for T in (512, 1024, 2048, 4096):
        q = torch.randn(1, 8, T, 64, requires_grad=True)
        k = torch.randn(1, 2, T, 64, requires_grad=True)
        v = torch.randn(1, 2, T, 64, requires_grad=True)
        pos = torch.arange(T)[None]
        mask = AttentionMask(pos, pos, plain_causal=True)
        for mode in ("forward", "forward+backward"):
            row = {"shape": f"prefill T={T}", "mode": mode}
            for b in backends:
                if mode == "forward":
                    def fn(b=b):
                        with torch.no_grad():
                            attention(q, k, v, mask, backend=b)
                else:
                    def fn(b=b):
                        attention(q, k, v, mask, backend=b).sum().backward()
                row[b] = 1e3 * median_s(fn, args.min_run_time)
            rows.append(row)
            print(row, flush=True)
    # Decode: one query per row, 9 query heads / 3 KV heads (SmolLM2), d 64.
    for B, S in ((1, 4096), (16, 2048), (16, 8192)):
        q = torch.randn(B, 9, 1, 64)
        k, v = torch.randn(B, 3, S, 64), torch.randn(B, 3, S, 64)
        row = {"shape": f"decode B={B} context={S}", "mode": "forward"}
        for b in backends:
            row[b] = 1e3 * median_s(lambda b=b: attention(q, k, v, None, backend=b), args.min_run_time)
        rows.append(row)
        print(row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                          "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print("\n| shape | mode | sdpa ms | flash ms | reference ms | flash / sdpa | reference / sdpa |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['mode']} | {r['sdpa']:.2f} | {r['flash']:.2f} | {r['reference']:.2f} | "
              f"{r['flash'] / r['sdpa']:.2f} | {r['reference'] / r['sdpa']:.2f} |")


if __name__ == "__main__":
    main()

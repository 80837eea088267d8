"""Peak memory of one attention training step (forward + backward): ``reference`` vs ``flash``.

Each point runs in a fresh subprocess and reports how far the step raised the process's peak
resident memory above what it held with the inputs allocated, so points do not contaminate each
other. Shapes: batch 1, 2 query heads sharing 1 KV head (MQA), head_dim 64, fp32, causal.
``reference`` materializes the (T × T) scores and probabilities and keeps them for backward;
``flash`` keeps only q, k, v, the output and the log-sum-exp.

    python benchmarks/attention_memory.py [--lengths 1024,2048,4096,8192,16384] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STEP = r"""
import json, resource, sys, time, torch
from kvlab.attention import AttentionMask, attention
backend, T = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
q = torch.randn(1, 2, T, 64, requires_grad=True)
k = torch.randn(1, 1, T, 64, requires_grad=True)
v = torch.randn(1, 1, T, 64, requires_grad=True)
pos = torch.arange(T)[None]
mask = AttentionMask(pos, pos, plain_causal=True)
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss_kb()
t = time.perf_counter()
out = attention(q, k, v, mask, backend=backend)
out.square().mean().backward()
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"backend": backend, "T": T, "extra_peak_MiB": (peak - before) / 1024, "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--backends", default="reference,flash")
    ap.add_argument("--out", default="benchmarks/results/attention_memory.json")
    ap.add_argument("--plot", default="benchmarks/results/attention_memory.png")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from --out without measuring")
    args = ap.parse_args()
    if args.replot:
        rows = json.loads(Path(args.out).read_text())["rows"]
        args.lengths = ",".join(str(T) for T in sorted({r["T"] for r in rows}))
        return plot_and_table(rows, args)
    rows = []
    for T in map(int, args.lengths.split(",")):
        for backend in args.backends.split(","):
            proc = subprocess.run([sys.executable, "-c", STEP, backend, str(T)], capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"backend": backend, "T": T, "error": proc.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(proc.stdout))
            print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    plot_and_table(rows, args)


def plot_and_table(rows: list[dict], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend, marker in (("reference", "o"), ("flash", "s")):
        pts = [(r["T"], r["extra_peak_MiB"]) for r in rows if r["backend"] == backend and "error" not in r]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=backend)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("peak RSS above inputs (MiB)")
    ax.set_title("Attention training step, 2 q heads / 1 KV head, d=64, fp32, CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print("\n| T | reference peak (MiB) | flash peak (MiB) | reference s | flash s |\n|---:|---:|---:|---:|---:|")
    by = {(r["backend"], r["T"]): r for r in rows}
    for T in map(int, args.lengths.split(",")):
        ref, fl = by.get(("reference", T), {}), by.get(("flash", T), {})
        print(f"| {T:,} | {ref.get('extra_peak_MiB', float('nan')):,.1f} | "
              f"{fl.get('extra_peak_MiB', float('nan')):,.1f} | "
              f"{ref.get('seconds', float('nan')):.2f} | {fl.get('seconds', float('nan')):.2f} |")


if __name__ == "__main__":
    main()

"""A/B of two source trees of kvlab on the same workloads: does a change slow the model down?

Each round runs one worker process per tree, the trees alternating (base, new, new, base, ...), each
worker on one thread and timed in process CPU time (wall time on a shared machine swings by tens of
percent), and reports per workload the median over rounds of each tree and of the per-round ratio
new / base, with the ratios' range.

Workloads, on the SmolLM2-135M shape with random weights in float32: building the model; a decode
step at batch 1 (512 cached tokens) and batch 4 (1,024 cached tokens), through ``forward`` with the
cache; a 256-token prefill; and ``generate`` of 32 tokens (the Python overhead per step included).

    python benchmarks/tree_ab.py --base /path/to/old/src --new src --rounds 5 --out benchmarks/results/ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent('''
    import json, statistics, time
    import torch
    torch.set_num_threads(1)
    from kvlab import ModelConfig, Transformer, generate

    def cpu(fn, n):
        fn()                                           # warm-up
        times = []
        for _ in range(n):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return statistics.median(times)

    out = {}
    cfg = ModelConfig.from_preset("smollm2-135m")
    torch.manual_seed(0)
    out["build_model_s"] = cpu(lambda: Transformer(cfg), 3)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def decode_case(batch, context, steps):
        cache = model.new_cache(batch, context + steps + 2)
        model(torch.randint(0, cfg.vocab_size, (batch, context), generator=g), cache=cache)
        token = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)
        return cpu(lambda: model(token, cache=cache), steps)

    out["decode_b1_ctx512_s"] = decode_case(1, 512, 20)
    out["decode_b4_ctx1024_s"] = decode_case(4, 1024, 10)
    prompt = torch.randint(0, cfg.vocab_size, (1, 256), generator=g)
    with torch.no_grad():
        out["prefill_256_s"] = cpu(lambda: model(prompt), 5)
    ids = prompt[0, :16].tolist()
    out["generate_32_s"] = cpu(lambda: generate(model, [ids], 32, stop_tokens=[]), 3)
    print(json.dumps(out))
''')


def run_worker(src: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the src/ directory of the reference tree")
    ap.add_argument("--new", default="src", help="the src/ directory of the tree under test (default: this one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="write the raw results as JSON here")
    args = ap.parse_args()
    runs = {"base": [], "new": []}
    for r in range(args.rounds):
        order = ("base", "new") if r % 2 == 0 else ("new", "base")
        for tree in order:
            runs[tree].append(run_worker(getattr(args, tree)))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = {}
    for key in runs["base"][0]:
        base = [x[key] for x in runs["base"]]
        new = [x[key] for x in runs["new"]]
        ratios = [n / b for n, b in zip(new, base)]
        rows[key] = {"base_median": statistics.median(base), "new_median": statistics.median(new),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    print(f"{'workload':22} {'base (ms CPU)':>14} {'new (ms CPU)':>14} {'new/base':>9} {'range':>13}")
    for key, row in rows.items():
        print(f"{key:22} {1e3 * row['base_median']:14.1f} {1e3 * row['new_median']:14.1f} "
              f"{row['ratio_median']:9.3f} {row['ratio_min']:6.3f}-{row['ratio_max']:.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                              "torch_threads": 1, "rounds": args.rounds, "summary": rows,
                                              "raw": runs}, indent=2))


if __name__ == "__main__":
    main()

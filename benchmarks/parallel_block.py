"""Training speed of the parallel block (GPT-J / PaLM: one norm, attention and MLP side by side, the
input projections of both in one matmul) against the sequential block, at the same shape.

Measures a full training step (forward, backward, AdamW) of byte-level models for the sequential
block, the parallel block with fused projections (kvlab's default for ``block="parallel"``) and
the parallel block with separate projections (the fusion switched off), interleaved round after
round so that drifts of the machine hit all three alike; reports the median step and tokens/s.
Quality (perplexity after the same training) is the study's: ``kvlab study --variants parallel``.

    python benchmarks/parallel_block.py [--rounds 7] [--out benchmarks/results/parallel_block.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kvlab import ModelConfig, Transformer
from kvlab.models.decoder import Block

SHAPES = {
    # The default study's model.
    "study (d 128, 4 layers, 8 heads, d_ff 384)": dict(d_model=128, n_layer=4, n_head=8, d_ff=384),
    # A wider one, where the matmuls dominate.
    "d 512, 4 layers, 8 heads, d_ff 1536": dict(d_model=512, n_layer=4, n_head=8, d_ff=1536),
}


def step_seconds(model, tokens, optimizer) -> float:
    t = time.perf_counter()
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/parallel_block.json")
    args = ap.parse_args()
    fused = Block._fused_projections
    rows = []
    for shape, dims in SHAPES.items():
        torch.manual_seed(0)
        tokens = torch.randint(0, 256, (args.batch_size, args.seq_len + 1))
        models = {}
        for name, block in (("sequential", "sequential"), ("parallel (fused)", "parallel"),
                            ("parallel (separate matmuls)", "parallel")):
            cfg = ModelConfig.from_preset("tiny", block=block, max_seq_len=args.seq_len, **dims)
            model = Transformer(cfg)
            models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), cfg.param_counts()["total"])
        times: dict[str, list[float]] = {name: [] for name in models}
        for r in range(args.rounds + 1):                        # round 0 warms up
            for name, (model, opt, _) in models.items():
                Block._fused_projections = fused if name != "parallel (separate matmuls)" else (lambda self, h: None)
                for _ in range(args.steps):
                    s = step_seconds(model, tokens, opt)
                    if r:
                        times[name].append(s)
        Block._fused_projections = fused
        base = statistics.median(times["sequential"])
        for name, (_, _, params) in models.items():
            med = statistics.median(times[name])
            row = {"shape": shape, "block": name, "params": params, "step_ms": 1e3 * med,
                   "tokens_per_s": args.batch_size * args.seq_len / med, "speedup_vs_sequential": base / med}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "batch_size": args.batch_size, "seq_len": args.seq_len, "rounds": args.rounds,
                               "steps": args.steps, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

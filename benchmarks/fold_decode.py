"""Decode step with the queries folded per KV head (what the sdpa backend does for a few queries)
against SDPA's own grouped path (``enable_gqa=True``), in one process, interleaved round by round,
one thread, process CPU time.

    python benchmarks/fold_decode.py --preset smollm2-135m --batch 4 --contexts 512,2048 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import kvlab.attention.kernels.sdpa as sdpa
from kvlab import ModelConfig, Transformer


def unfolded(q, k, v, attn_mask, scale):
    """SDPA's grouped path for every call (the backend before folding equal widths)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset)).eval()
    folded_fn = sdpa._attend
    out = {}
    for context in (int(c) for c in args.contexts.split(",")):
        cache = model.new_cache(args.batch, context + 1)
        for t in (*cache.keys.values(), *cache.values.values()):
            t.copy_(torch.randn(t.shape))
        token = torch.randint(0, model.cfg.vocab_size, (args.batch, 1))

        @torch.inference_mode()
        def timed(fn) -> float:
            sdpa._attend = fn
            t = time.process_time()
            for _ in range(args.steps):
                cache.assume_filled(context)
                model(token, cache=cache)
            return (time.process_time() - t) / args.steps

        timed(folded_fn)
        timed(unfolded)
        ratios, times = [], {"folded": [], "unfolded": []}
        for r in range(args.rounds):
            order = (("folded", folded_fn), ("unfolded", unfolded))
            pair = {name: timed(fn) for name, fn in (order if r % 2 == 0 else order[::-1])}
            for name, value in pair.items():
                times[name].append(value)
            ratios.append(pair["folded"] / pair["unfolded"])
        sdpa._attend = folded_fn
        out[context] = {"folded_ms": 1e3 * statistics.median(times["folded"]),
                        "unfolded_ms": 1e3 * statistics.median(times["unfolded"]),
                        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        row = out[context]
        print(f"context {context}: folded {row['folded_ms']:.1f} ms, enable_gqa {row['unfolded_ms']:.1f} ms, "
              f"folded / enable_gqa {row['ratio']:.3f} ({min(ratios):.3f}-{max(ratios):.3f})", flush=True)
    print(json.dumps({"preset": args.preset, "batch": args.batch, "rounds": args.rounds, "results": out}))


if __name__ == "__main__":
    main()

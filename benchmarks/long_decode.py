"""Decode at long context, by attention kind: the cache memory each holds and the time of a decode
step, at contexts from 1k to 64k tokens (the issue's "decode memory/speed at long context").

One model shape (d_model 256, 4 layers, 8 heads of 32, fp32, batch 8, random weights — speed and
memory do not depend on training) with each kind: full MHA, GQA-2, MQA, a 512-token rolling
window, the window with 4 sinks, a Gemma-like hybrid (3 windowed layers, 1 global), a block-sparse
layout (full cache, fewer keys read), MLA (latent 64 + RoPE 16), low-rank K/V (key latent 24 +
value latent 56: MLA's bytes, keys rebuilt every step), memory compression (window 512 plus
a summary per 32 older tokens) and linear attention (a fixed state).
For each: the bytes the cache allocates (``cache.nbytes``, from the cache itself) against the
closed form's, and the median decode step (the cache filled to the context, one new token per row).

    python benchmarks/long_decode.py [--contexts 1024,4096,16384,65536] [--kinds "MLA,low-rank"]
                                     [--out benchmarks/results/long_decode.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from kvlab import ModelConfig, Transformer, cache_bytes
from kvlab.eval.bench import measure_decode

SHAPE = dict(vocab_size=256, d_model=256, n_layer=4, n_head=8, max_seq_len=131072)
KINDS = {
    "MHA": dict(),
    "GQA-2": dict(n_kv_head=2),
    "MQA": dict(n_kv_head=1),
    "window 512": dict(sliding_window=512),
    "window 512 + 4 sinks": dict(sliding_window=512, attention_sinks=4),
    "hybrid (3 windowed + 1 global)": dict(attention_layers=[{"kind": "gqa", "window": 512}] * 3 + ["gqa"]),
    "block-sparse (block 128, local 2, global 1)": dict(block_sparse={"block": 128, "local": 2, "global": 1}),
    "MLA (latent 64 + RoPE 16)": dict(attn_kind="mla", attn_options=dict(kv_lora_rank=64, qk_rope_head_dim=16)),
    "low-rank (K 24 + V 56)": dict(attn_kind="lowrank", attn_options=dict(k_rank=24, v_rank=56)),
    "compressed (window 512, block 32)": dict(attention_layers=[{"kind": "compressed", "window": 512,
                                                                 "block": 32}] * 4),
    "linear (elu, RetNet decay)": dict(attn_kind="linear"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,4096,16384,65536")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--kinds", default=None, help="comma-separated name prefixes to run (default: all)")
    ap.add_argument("--out", default="benchmarks/results/long_decode.json")
    args = ap.parse_args()
    rows = []
    wanted = None if args.kinds is None else [k.strip() for k in args.kinds.split(",")]
    for name, changes in KINDS.items():
        if wanted is not None and not any(name.startswith(w) for w in wanted):
            continue
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**SHAPE, **changes)).eval()
        for context in (int(c) for c in args.contexts.split(",")):
            speed = measure_decode(model, args.batch_size, context, steps=args.steps, warmup=1)
            closed = args.batch_size * cache_bytes(model.cfg, torch.float32).for_sequence(context + 1)
            row = {"kind": name, "context": context, "cache_bytes": speed.kv_bytes_per_step,
                   "closed_form_bytes": closed, "step_ms": speed.step_ms, "tokens_per_s": speed.tokens_per_s}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "torch": torch.__version__, "shape": SHAPE,
                               "batch_size": args.batch_size, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Decode step with a quantized KV cache against the same model with its plain cache, per format and
context: the cost of reading a quantized cache in kvlab (one process, interleaved rounds, one thread,
process CPU time; ``kvlab.recipes.shrink.speed.decode_ratio``).

    python benchmarks/kv_quant_decode.py --batch 4 --contexts 512,2048 --formats none,fp8,int8,int4
"""

from __future__ import annotations

import argparse
import json

import torch

from kvlab import ModelConfig, Transformer
from kvlab.dtypes import parse_kv_quant
from kvlab.recipes.shrink.speed import decode_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--formats", default="none,fp8,int8,int4", help="'none' measures the model against itself")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset)).eval()
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for fmt in args.formats.split(","):
            r = decode_ratio(model, model, parse_kv_quant(fmt), batch=args.batch, context=context, rounds=args.rounds)
            rows.append({"format": fmt, **r.to_dict()})
            print(f"{context:>6} {fmt:5} plain {r.original_ms:7.1f} ms  quantized {r.candidate_ms:7.1f} ms  "
                  f"ratio {r.ratio:.2f} ({r.ratio_min:.2f}-{r.ratio_max:.2f})", flush=True)
    print(json.dumps({"preset": args.preset, "rows": rows}))


if __name__ == "__main__":
    main()

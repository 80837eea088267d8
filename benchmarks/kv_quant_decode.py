"""Decode step with a quantized KV cache against the original model with its plain cache, per format,
context and structure: the cost of reading a quantized cache in kvlab (one process, interleaved rounds,
one thread, process CPU time; ``kvlab.recipes.shrink.speed.decode_ratio``). Structures other than the
original's (``mqa``: one KV head, so every query head of a layer reads it; ``mla-R-P``: MLA with an
R-wide latent and a P-wide RoPE key) show the cost of their own shape next to that of their cache's
precision; weights are random (speed does not depend on them).

    python benchmarks/kv_quant_decode.py --batch 4 --contexts 512,2048 --formats none,fp8,int8,int4 \
        --structures original,mqa,mla-160-32
"""

from __future__ import annotations

import argparse
import json

import torch

from kvlab import ModelConfig, Transformer
from kvlab.convert.mla import plan_mla
from kvlab.dtypes import parse_kv_quant
from kvlab.recipes.shrink.speed import decode_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--formats", default="none,fp8,int8,int4", help="'none' measures the model against itself")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--structures", default="original", help="original, mqa, mla-R-P (comma-separated)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    model = Transformer(cfg).eval()
    rows = []
    for structure in args.structures.split(","):
        candidate = model if structure == "original" else Transformer(_structure(cfg, structure)).eval()
        for context in (int(c) for c in args.contexts.split(",")):
            for fmt in args.formats.split(","):
                r = decode_ratio(model, candidate, parse_kv_quant(fmt), batch=args.batch, context=context,
                                 rounds=args.rounds)
                rows.append({"structure": structure, "format": fmt, **r.to_dict()})
                print(f"{structure:>11} {context:>6} {fmt:5} original {r.original_ms:7.1f} ms  candidate "
                      f"{r.candidate_ms:7.1f} ms  ratio {r.ratio:.2f} ({r.ratio_min:.2f}-{r.ratio_max:.2f})",
                      flush=True)
    print(json.dumps({"preset": args.preset, "rows": rows}))


def _structure(cfg: ModelConfig, name: str) -> ModelConfig:
    if name == "mqa":
        return cfg.replace(n_kv_head=1)
    _, rank, rope = name.split("-")
    return plan_mla(cfg, kv_lora_rank=int(rank), qk_rope_head_dim=int(rope))


if __name__ == "__main__":
    main()

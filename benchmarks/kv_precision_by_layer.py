"""A cache precision per layer on SmolLM2-135M: the loss estimate against measured perplexity, and the
allocation against one format for every layer at the same bytes.

Calibration (``--calibration-tokens`` of the built-in train split, as ``kvlab shrink`` takes them):
the Fisher estimate of each layer's rounding cost per format (``rounding_costs``), its calibration on
two measured caches (``calibrated_costs``), and for each budget the allocation
(``allocate_precisions``). Each allocation and each uniform format is then measured through the
cache on the validation split (``--tokens``), so the table shows what the estimate predicted and what
the model did.

    OMP_NUM_THREADS=2 python benchmarks/kv_precision_by_layer.py [--tokens 16384] \\
        [--budgets 11520,10080,8640,7680] [--out benchmarks/results/precision/kv_precision_by_layer.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import kvlab
from kvlab.convert.lowrank import kv_loss_moments
from kvlab.data.corpus import builtin_corpus
from kvlab.data.windows import calibration_batches
from kvlab.eval.perplexity import evaluate
from kvlab.eval.precision import allocate_precisions, calibrated_costs, rounding_costs
from kvlab.models.modes import frozen

UNIFORM = "int8,fp8,int8/int4-h,int4-h/int8,int4-h"     # formats of the allocation (layer_formats), every layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=16384, help="validation tokens scored per cache")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--budgets", default="11520,10080,8640,7680", help="bytes per token, comma-separated")
    ap.add_argument("--uniform", default=UNIFORM, help="one format for every layer, measured beside the allocations")
    ap.add_argument("--balance-keys", action="store_true",
                    help="store the keys balanced first (kvlab.convert.balance), as kvlab shrink does for kvlab")
    ap.add_argument("--out", default="benchmarks/results/precision/kv_precision_by_layer.json")
    args = ap.parse_args()
    model = kvlab.load(args.model)
    if args.balance_keys:
        from kvlab.convert.balance import BALANCE_WINDOW, balance_keys

        window = min(model.cfg.max_seq_len, BALANCE_WINDOW)
        model = balance_keys(model, calibration_batches(model.tokenizer, args.calibration_tokens, seq_len=window,
                                                        batch_size=max(1, 4096 // window), seed=0))
    frozen(model)
    calibration = calibration_batches(model.tokenizer, args.calibration_tokens, seed=0)
    t0 = time.perf_counter()
    raw = rounding_costs(model, calibration, kv_loss_moments(model, calibration))
    costs, scales = calibrated_costs(model, calibration, raw)
    estimate_seconds = time.perf_counter() - t0
    print(json.dumps({"scales": scales, "estimate_seconds": estimate_seconds}), flush=True)
    docs = builtin_corpus("validation")

    def loss(kv_quant) -> float:
        r = evaluate(model, model.tokenizer, docs, seq_len=1024, stride=1024, max_tokens=args.tokens, batch_size=4,
                     progress=False, kv_quant=kv_quant)
        return math.log(r.perplexity)

    plain = loss(None)
    rows = []

    def row(label, kv_quant, predicted):
        measured = loss(kv_quant) - plain
        r = {"cache": label, "kv_quant": str(kv_quant),
             "bytes_per_token": model.cfg.kv_bytes_per_token("bf16", kv_quant), "predicted_nats": predicted,
             "measured_nats": measured, "perplexity": math.exp(plain + measured),
             "change_pct": 100 * math.expm1(measured)}
        rows.append(r)
        print(json.dumps(r), flush=True)

    for name in args.uniform.split(","):
        kf, _, vf = name.partition("/")
        vf = vf or kf
        row(f"{name} (every layer)", name, sum(c["k"][kf] + c["v"][vf] for c in costs.values()))
    for budget in (int(b) for b in args.budgets.split(",")):
        kv_quant, predicted = allocate_precisions(model.cfg, costs, budget)
        row(f"by layer within {budget:,} B", kv_quant, predicted)
    names = next(iter(raw.values()))["k"]
    raw_totals = {f"{f}:{n}": sum(c[f][n] for c in raw.values()) for f in ("k", "v") for n in names}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                               "original_perplexity": math.exp(plain), "scales": scales,
                               "raw_estimate_totals": raw_totals, "estimate_seconds": estimate_seconds,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

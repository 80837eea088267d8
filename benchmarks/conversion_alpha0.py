"""SmolLM2-135M and its KV conversions before any training (α = 0 of the uptraining study).

For each variant: KV bytes per token (bf16) and perplexity / bits per byte on the built-in
corpus's validation split, all in one run so the rows are comparable.

    python benchmarks/conversion_alpha0.py [--max-tokens N] [--seq-len L] [--calibration-tokens N] [--out FILE.json]

Calibrated conversions use ``--calibration-tokens`` of the built-in corpus's *train* split
(random 512-token windows, seed 0); the perplexity is on its validation split.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import kvlab
from kvlab.convert.heads import convert
from kvlab.data.corpus import builtin_corpus, corpus_fingerprint
from kvlab.data.windows import calibration_batches
from kvlab.eval.perplexity import evaluate

VARIANTS = [  # (label, conversion kwargs or None for the original model)
    ("SmolLM2-135M (GQA-3, original)", None),
    ("MQA, mean", dict(n_kv_head=1, method="mean")),
    ("MQA, first", dict(n_kv_head=1, method="first")),
    ("MQA, random", dict(n_kv_head=1, method="random")),
    ("GQA-3-CLA2, mean", dict(cla=2, method="mean")),
    ("GQA-3-CLA2, first", dict(cla=2, method="first")),
    ("MQA-CLA2, mean", dict(n_kv_head=1, cla=2, method="mean")),
    ("MQA, calibrated", dict(n_kv_head=1, method="calibrated")),
    ("GQA-3-CLA2, calibrated", dict(cla=2, method="calibrated")),
    ("MQA-CLA2, calibrated", dict(n_kv_head=1, cla=2, method="calibrated")),
    ("MQA-CLA2, calibrated heads then mean layers", [dict(n_kv_head=1, method="calibrated"),
                                                     dict(cla=2, method="mean")]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=None, help="cap on scored tokens (default: whole split)")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--only", help="';'-separated variant labels to run (default: all)")
    ap.add_argument("--out", default="benchmarks/results/alpha0.json")
    args = ap.parse_args()

    base = kvlab.load(args.model)
    docs = builtin_corpus("validation")
    calibration = calibration_batches(base.tokenizer, args.calibration_tokens, seed=0)
    rows = []
    chosen = [v for v in VARIANTS if args.only is None or v[0] in [s.strip() for s in args.only.split(";")]]
    if not chosen:
        raise SystemExit(f"--only {args.only!r} names no variant; the labels are: {[v[0] for v in VARIANTS]}")
    for label, steps in chosen:
        t0 = time.perf_counter()
        model = base
        for kw in [] if steps is None else steps if isinstance(steps, list) else [steps]:
            extra = dict(calibration=calibration) if kw["method"] == "calibrated" else {}
            model = convert(model, seed=0, **kw, **extra)
        r = evaluate(model, base.tokenizer, docs, seq_len=args.seq_len, max_tokens=args.max_tokens, progress=False)
        rows.append({"variant": label, "n_kv_head": model.cfg.n_kv_head, "n_kv_layers": model.cfg.n_kv_layers,
                     "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token("bf16"), **r.to_dict(),
                     "seconds": time.perf_counter() - t0})
        print(f"{label:32} KV {rows[-1]['kv_bytes_per_token_bf16']:>6} B/token  ppl {r.perplexity:10.3f}  "
              f"bpb {r.bits_per_byte:.4f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    meta = {"model": args.model, "data": "builtin:validation", "data_fingerprint": corpus_fingerprint(docs),
            "seq_len": args.seq_len, "max_tokens": args.max_tokens, "calibration_tokens": args.calibration_tokens,
            "calibration_data": "builtin:train", "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n| variant | KV heads | KV layers | KV bytes/token (bf16) | val perplexity | bits/byte |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['n_kv_head']} | {r['n_kv_layers']} | {r['kv_bytes_per_token_bf16']:,} | "
              f"{r['perplexity']:.2f} | {r['bits_per_byte']:.3f} |")
    print(f"\n{rows[0]['tokens']:,} tokens, {rows[0]['documents']} documents, corpus {meta['data_fingerprint']}")


if __name__ == "__main__":
    main()

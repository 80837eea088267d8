"""SmolLM2-135M at α = 0: each conversion's starting point before and after the output refit
(``kvlab.convert.refit``), validation perplexity on the built-in corpus.

    python benchmarks/refit_alpha0.py [--starts "MLA 160+32,GQA-3-CLA2 calibrated,MQA calibrated"]
                                      [--out benchmarks/results/refit_alpha0.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import kvlab
from kvlab.convert import convert, convert_to_mla
from kvlab.convert.refit import RIDGES, TOLERANCE, refit_outputs
from kvlab.data.corpus import builtin_corpus, corpus_fingerprint
from kvlab.data.windows import calibration_batches
from kvlab.eval.perplexity import evaluate

STARTS = {
    "MLA 160+32": lambda base, calib: convert_to_mla(base, kv_lora_rank=160, qk_rope_head_dim=32, calibration=calib),
    "MLA 80+48": lambda base, calib: convert_to_mla(base, kv_lora_rank=80, qk_rope_head_dim=48, calibration=calib),
    "MLA 32+32": lambda base, calib: convert_to_mla(base, kv_lora_rank=32, qk_rope_head_dim=32, calibration=calib),
    "GQA-3-CLA2 calibrated": lambda base, calib: convert(base, cla=2, method="calibrated", calibration=calib),
    "MQA calibrated": lambda base, calib: convert(base, n_kv_head=1, method="calibrated", calibration=calib),
    "MQA mean": lambda base, calib: convert(base, n_kv_head=1, method="mean"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--starts", default="MLA 160+32,GQA-3-CLA2 calibrated,MQA calibrated",
                    help=f"comma-separated, from: {', '.join(STARTS)}")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/results/refit_alpha0.json")
    args = ap.parse_args()
    base = kvlab.load(args.model)
    docs = builtin_corpus("validation")
    calib = calibration_batches(base.tokenizer, args.calibration_tokens, seed=0)

    def ppl(model) -> float:
        with torch.no_grad():
            return evaluate(model, base.tokenizer, docs, seq_len=1024, max_tokens=args.max_tokens,
                            progress=False).perplexity

    rows = [{"start": "original", "kv_bytes_per_token_bf16": base.cfg.kv_bytes_per_token(), "perplexity": ppl(base)}]
    print(f"original: {rows[0]['perplexity']:.3f}", flush=True)
    for name in args.starts.split(","):
        model = STARTS[name.strip()](base, calib)
        before = ppl(model)
        t = time.perf_counter()
        report = refit_outputs(base, model, calib)
        seconds = time.perf_counter() - t
        rows.append({"start": name, "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token(),
                     "perplexity": before, "refit_perplexity": ppl(model), "refit_seconds": seconds,
                     "ridges": report["ridge"]})
        print(f"{name:24} {rows[-1]['kv_bytes_per_token_bf16']:>6} B/token  alpha=0 {before:10.2f}  "
              f"refit {rows[-1]['refit_perplexity']:9.2f}  ({seconds:.0f} s)", flush=True)
    meta = {"model": args.model, "data_fingerprint": corpus_fingerprint(docs), "max_tokens": args.max_tokens,
            "calibration_tokens": args.calibration_tokens, "ridges": list(RIDGES), "tolerance": TOLERANCE,
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""SmolLM2-135M converted to low-rank K/V latents (Palu; the ``lowrank`` kind) before any training
(α = 0): KV budget × the keys' share of the latent channels, and the output refit on the best split.

For each budget (bytes per token, bf16) and key share: validation perplexity on the built-in corpus
(``--max-tokens`` of it at 1,024 tokens of context), calibrated on ``--calibration-tokens`` of its
train split (the same text and settings as ``mla_alpha0.py`` and ``refit_alpha0.py``, so the rows
compare with MLA's at equal bytes).

    python benchmarks/lowrank_alpha0.py [--budgets 2,3,6,12] [--out benchmarks/results/lowrank_alpha0.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvlab
from alpha0_record import write_alpha0_results  # benchmarks/, next to this script
from kvlab.convert.calibrated import attention_input_moments
from kvlab.convert.lowrank import convert_to_lowrank
from kvlab.convert.refit import refit_outputs
from kvlab.data.corpus import builtin_corpus
from kvlab.data.windows import calibration_batches
from kvlab.eval.perplexity import evaluate

K_SHARES = (4, 3, 2)        # a quarter, a third, half of the channels for the keys (kvlab shrink's splits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="2,3,6,12", help="reduction factors of the KV cache")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/results/lowrank_alpha0.json")
    args = ap.parse_args()
    base = kvlab.load(args.model)
    docs = builtin_corpus("validation")
    calibration = calibration_batches(base.tokenizer, args.calibration_tokens, seed=0)
    moments = attention_input_moments(base, calibration)

    def ppl(model) -> float:
        with torch.no_grad():
            return evaluate(model, base.tokenizer, docs, seq_len=1024, max_tokens=args.max_tokens,
                            progress=False).perplexity

    original = base.cfg.kv_bytes_per_token()
    rows = [{"variant": "original", "kv_bytes_per_token_bf16": original, "perplexity": ppl(base)}]
    print(f"original: {rows[0]['perplexity']:.3f}", flush=True)
    for factor in (int(f) for f in args.budgets.split(",")):
        channels = original // factor // (2 * base.cfg.n_kv_layers)
        best = None
        for share in K_SHARES:
            k_rank = round(channels / share)
            model = convert_to_lowrank(base, k_rank=k_rank, v_rank=channels - k_rank, moments=moments)
            row = {"variant": f"Low-rank K{k_rank}+V{channels - k_rank}", "kv_factor": factor, "k_rank": k_rank,
                   "v_rank": channels - k_rank, "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token(),
                   "perplexity": ppl(model)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if best is None or row["perplexity"] < best[0]["perplexity"]:
                best = (row, model)
        row, model = best
        t = time.perf_counter()
        refit_outputs(base, model, calibration)
        row["refit_perplexity"], row["refit_seconds"] = ppl(model), time.perf_counter() - t
        print(f"  refit {row['variant']}: {row['refit_perplexity']:.3f}", flush=True)
    write_alpha0_results(args.out, rows, model=args.model, docs=docs, max_tokens=args.max_tokens,
                         calibration_tokens=args.calibration_tokens)


if __name__ == "__main__":
    main()

"""SmolLM2-135M converted to MLA before any training (α = 0): latent width × RoPE width × method.

For each (kv_lora_rank, qk_rope_head_dim, method, latent_norm): KV bytes per token (bf16) and
validation perplexity on the built-in corpus (``--max-tokens`` of it), calibrated on
``--calibration-tokens`` of its train split.

    python benchmarks/mla_alpha0.py [--max-tokens 8192] [--out benchmarks/results/mla_alpha0.json]
"""

from __future__ import annotations

import argparse
import time

import torch

import kvlab
from alpha0_record import write_alpha0_results  # benchmarks/, next to this script
from kvlab.convert.calibrated import attention_input_moments
from kvlab.convert.lowrank import kv_loss_moments
from kvlab.convert.mla import convert_to_mla
from kvlab.data.corpus import builtin_corpus
from kvlab.data.windows import calibration_batches
from kvlab.eval.perplexity import evaluate

GRID = [  # (kv_lora_rank, qk_rope_head_dim, method, latent_norm); 30 layers x (rank + rope) x 2 bytes
    (128, 64, "pca", False), (144, 48, "pca", False), (160, 32, "pca", False), (176, 16, "pca", False),
    (160, 32, "whitened", False), (160, 32, "pca", True),
    (96, 32, "pca", False), (112, 16, "pca", False), (80, 48, "pca", False),
    (32, 32, "pca", False), (48, 16, "pca", False),
    (16, 16, "pca", False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--grid", metavar="RANK+ROPE,...",
                    help="latent + RoPE widths to convert, each with every --methods (default: the built-in grid)")
    ap.add_argument("--methods", default="pca", help="with --grid: latent fits, comma-separated (pca, whitened, "
                                                        "fisher: the loss's metric)")
    ap.add_argument("--out", default="benchmarks/results/mla_alpha0.json")
    args = ap.parse_args()
    widths = [w.split("+") for w in args.grid.split(",")] if args.grid else []
    grid = [(int(r), int(p), m, False) for r, p in widths for m in args.methods.split(",")] if args.grid else GRID
    base = kvlab.load(args.model)
    docs = builtin_corpus("validation")
    calibration = calibration_batches(base.tokenizer, args.calibration_tokens, seed=0)
    moments = attention_input_moments(base, calibration)
    loss_moments = kv_loss_moments(base, calibration) if any(m == "fisher" for _, _, m, _ in grid) else None

    def ppl(model) -> float:
        with torch.no_grad():
            return evaluate(model, base.tokenizer, docs, seq_len=1024, max_tokens=args.max_tokens,
                            progress=False).perplexity

    rows = [{"variant": "original", "kv_bytes_per_token_bf16": base.cfg.kv_bytes_per_token(), "perplexity": ppl(base)}]
    print(f"original: {rows[0]['perplexity']:.3f}", flush=True)
    for rank, rope, method, norm in grid:
        t0 = time.perf_counter()
        model = convert_to_mla(base, kv_lora_rank=rank, qk_rope_head_dim=rope, method=method, latent_norm=norm,
                               calibration=calibration, moments=moments, loss_moments=loss_moments)
        rows.append({"variant": f"MLA {rank}+{rope}", "kv_lora_rank": rank, "qk_rope_head_dim": rope,
                     "method": method, "latent_norm": norm, "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token(),
                     "perplexity": ppl(model), "seconds": time.perf_counter() - t0})
        print(f"{rank:4}+{rope:<3} {method:8} norm={norm!s:5} {rows[-1]['kv_bytes_per_token_bf16']:>6} B/token "
              f"ppl {rows[-1]['perplexity']:9.3f}", flush=True)
    write_alpha0_results(args.out, rows, model=args.model, docs=docs, max_tokens=args.max_tokens,
                         calibration_tokens=args.calibration_tokens)


if __name__ == "__main__":
    main()

"""Quantized KV caches on SmolLM2-135M: perplexity, decode speed and the planner's batch gain per bit width.

For each cache (fp32 as loaded, int8, int4 — kvlab.cache.quantized: groups of 32 channels with one
float16 scale):

- perplexity on the built-in validation split, every window run through a cache of that kind (so
  every query attends to quantized keys and values, as in generation);
- greedy decode speed: a batch of prompts of ``--prompt-tokens`` from the corpus, ``--new-tokens``
  new ones, tokens/s of the decode steps (prefill excluded) and agreement of the greedy tokens with
  the fp32 cache's;
- KV bytes per token and the planner's largest batch (bf16 weights, ``--memory``, ``--context``).

    python benchmarks/kv_quant.py [--max-tokens 16384] [--seq-len 1024] [--batch 16] [--quants none,int8,int8/int4,int4]
        [--no-decode] [--balance-keys 8192] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import kvlab
from kvlab.data.corpus import builtin_corpus
from kvlab.eval.perplexity import evaluate
from kvlab.eval.plan import max_batch, parse_size
from kvlab.inference.generation import generate

QUANTS = "none,int8,int4"


def decode_speed(model, prompts, new_tokens, kv_quant):
    stamps: list[float] = []
    t0 = time.perf_counter()
    out = generate(model, prompts, new_tokens, stop_tokens=[], kv_quant=kv_quant,
                   on_token=lambda row, tok: stamps.append(time.perf_counter()) if row == 0 else None)
    B = len(prompts)
    decode_s = stamps[-1] - stamps[0]
    return out, {"ttft_s": stamps[0] - t0, "decode_tokens_per_s": B * (len(stamps) - 1) / decode_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--memory", default="24GiB")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--quants", default=QUANTS,
                   help="caches to measure, comma-separated (none first: the reference); keys/values apart as "
                        "int8/int4")
    p.add_argument("--no-decode", action="store_true", help="perplexity and bytes only (no decode timing)")
    p.add_argument("--balance-keys", type=int, default=0, metavar="N",
                   help="store the keys balanced first (kvlab.convert.balance), fitted on N calibration tokens of "
                        "the train split (0: keys as projected)")
    p.add_argument("--out", default="benchmarks/results/kv_quant.json")
    args = p.parse_args()

    model = kvlab.load("smollm2-135m")
    tok = model.tokenizer
    if args.balance_keys:
        from kvlab.convert.balance import BALANCE_WINDOW, balance_keys
        from kvlab.data.windows import calibration_batches

        window = min(model.cfg.max_seq_len, BALANCE_WINDOW)     # the windows convert and shrink fit on
        model = balance_keys(model, calibration_batches(tok, args.balance_keys, seq_len=window,
                                                        batch_size=max(1, 4096 // window)))
    docs = builtin_corpus("validation")
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc.text, add_special_tokens=False)
        if len(ids) >= args.batch * args.prompt_tokens:
            break
    prompts = [ids[i * args.prompt_tokens:(i + 1) * args.prompt_tokens] for i in range(args.batch)]
    memory = parse_size(args.memory)
    rows, reference = [], None
    for q in [None if name == "none" else name for name in args.quants.split(",")]:
        t0 = time.perf_counter()
        ppl = evaluate(model, tok, docs, seq_len=args.seq_len, stride=args.seq_len, max_tokens=args.max_tokens,
                       batch_size=4, progress=False, kv_quant=q)
        eval_s = time.perf_counter() - t0
        speed = {}
        if not args.no_decode:
            out, speed = decode_speed(model, prompts, args.new_tokens, q)
            if reference is None:
                reference = out
            speed["greedy_agreement_with_fp32"] = (sum(a == b for o, r in zip(out, reference) for a, b in zip(o, r))
                                                   / sum(map(len, reference)))
        row = {"kv_quant": q or "none (fp32 cache)", "perplexity": ppl.perplexity, "tokens_scored": ppl.tokens,
               "eval_s": eval_s, **speed,
               "kv_bytes_per_token_fp32_model": model.cfg.kv_bytes_per_token(torch.float32, q),
               "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token("bf16", q),
               "planner_max_batch": max_batch(model.cfg, memory, args.context, "bf16", q)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["perplexity_change_pct"] = 100 * (r["perplexity"] / base["perplexity"] - 1)
        r["planner_batch_gain_vs_bf16"] = r["planner_max_batch"] / base["planner_max_batch"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                           "torch": torch.__version__},
                               "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

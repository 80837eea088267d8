"""``kvlab eval``: perplexity and bits per byte."""

from __future__ import annotations

import argparse
import json

from kvlab.cli.common import kv_quant_arg, load_model, model_args, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per byte on a corpus",
                       description="Perplexity and bits per byte. Documents are scored separately, each after "
                                   "one BOS/EOS context token, long ones in windows of --seq-len tokens advancing "
                                   "by --stride, every token scored once.")
    model_args(p, adapter=True, window=True)
    p.add_argument("--data", default="builtin", help="'builtin' (validation split), 'builtin:train', a text "
                                                     "file, a .jsonl file (field 'text') or a directory of .txt")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stride", type=int, help="window advance (default seq-len / 2)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--batch-size", type=positive_int, default=4)
    kv_quant_arg(p)
    p.add_argument("--backend", help="attention backend: reference, sdpa, flash, triton or auto (default: the model's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.data.corpus import corpus_fingerprint, read_documents
    from kvlab.eval.perplexity import evaluate

    docs = read_documents(args.data)
    model = load_model(args)
    result = evaluate(model, model.tokenizer, docs, seq_len=args.seq_len, stride=args.stride,
                      max_tokens=args.max_tokens, batch_size=args.batch_size, progress=not args.no_progress,
                      backend=args.backend, kv_quant=args.kv_quant)
    out = {"model": str(args.model), "data": args.data, "data_fingerprint": corpus_fingerprint(docs),
           "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token("bf16"), "kv_quant": args.kv_quant,
           "kv_bytes_per_token": model.cfg.kv_bytes_per_token(model.dtype, args.kv_quant), **result.to_dict()}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model} on {args.data}: perplexity {result.perplexity:.3f}, {result.bits_per_byte:.4f} "
              f"bits/byte, {result.tokens:,} tokens ({result.bytes:,} bytes, {result.documents} documents), "
              f"windows of {result.seq_len} with stride {result.stride}")
    return 0

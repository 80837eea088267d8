"""``kvlab eval``: perplexity and bits per byte."""

from __future__ import annotations

import argparse
import json

from kvlab.cli.common import UsageError, kv_quant_arg, load_model, model_args, positive_int
from kvlab.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per byte on a corpus",
                       description="Perplexity and bits per byte. Documents are scored separately, each after "
                                   "one BOS/EOS context token, long ones in windows of --seq-len tokens advancing "
                                   "by --stride, every token scored once.")
    model_args(p, adapter=True, window=True)
    p.add_argument("--data", default="builtin", help="'builtin' (validation split), 'builtin:train', a text "
                                                     "file, a .jsonl file (text or chat records), a directory, a "
                                                     "glob; with ':validation' / ':train' after your own text, one "
                                                     "side of its held-out split (as shrink and train hold it out)")
    p.add_argument("--original", metavar="MODEL",
                   help="also compare with this model (the original a model was shrunk from) on the same tokens: "
                        "perplexity ratio, mean KL(original || model) per token and top-1 agreement; the original "
                        "reads through a float cache")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stride", type=int, help="window advance (default seq-len / 2)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--batch-size", type=positive_int, default=4)
    kv_quant_arg(p)
    p.add_argument("--backend", help="attention backend: reference, sdpa, flash, triton or auto (default: the model's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--num-beams", type=positive_int, default=1,
                   help="an encoder–decoder: beam search for the exact-match accuracy (default 1: greedy)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _run_seq2seq(args: argparse.Namespace, model) -> int:
    """An encoder–decoder: target perplexity and exact-match accuracy on held-out pairs (the built-in
    tasks' test split, or every pair of a JSONL file), with the generation time per sample."""
    from kvlab.eval.seq2seq import exact_match, target_loss
    from kvlab.recipes.seq2seq import evaluation_pairs

    if args.kv_quant != "none" or getattr(args, "window", None) is not None:
        raise UsageError("kvlab eval: --kv-quant and --window are for decoder-only models")
    if model.tokenizer is None:
        raise UsageError(f"kvlab eval: {args.model} has no tokenizer to read the pairs with")
    try:
        pairs = evaluation_pairs(args.data)
    except ConfigError as e:
        raise UsageError(f"kvlab eval: {e}") from None
    if args.max_tokens is not None:
        pairs = pairs[:max(1, args.max_tokens // 32)]
    loss = target_loss(model, pairs, model.tokenizer, batch_size=args.batch_size)
    match = exact_match(model, pairs, model.tokenizer, num_beams=args.num_beams, batch_size=args.batch_size,
                        backend=args.backend)
    cost = model.cfg.cache_bytes("bf16")
    out = {"model": str(args.model), "data": args.data, "pairs": len(pairs), **loss,
           **{k: match[k] for k in ("accuracy", "per_task", "num_beams", "seconds_per_sample", "samples")},
           "kv_bytes_per_token_bf16": cost.per_token, "cross_bytes_per_source_token_bf16": cost.per_source_token}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model} on {args.data}: target perplexity {loss['perplexity']:.3f} over {loss['target_tokens']:,} "
              f"target tokens of {len(pairs):,} pairs; exact match {match['accuracy']:.1%} "
              f"({'beam ' + str(args.num_beams) if args.num_beams > 1 else 'greedy'}, "
              f"{match['seconds_per_sample'] * 1e3:.1f} ms per sample)")
    return 0


def run(args: argparse.Namespace) -> int:
    from kvlab.data.corpus import corpus_fingerprint
    from kvlab.data.sources import read_documents
    from kvlab.eval.perplexity import evaluate

    model = load_model(args)
    if model.cfg.is_encoder_decoder:
        return _run_seq2seq(args, model)
    if args.num_beams > 1:
        raise UsageError("kvlab eval: --num-beams scores an encoder–decoder's generated targets; this model is "
                         "decoder-only")
    docs = read_documents(args.data, tokenizer=model.tokenizer)
    original = None
    if args.original:           # loaded before any scoring, so that a wrong path fails at once
        from kvlab.recipes.loading import ModelSource
        from kvlab.recipes.loading import load_model as load

        original = load(ModelSource(model=args.original, device=args.device, model_dtype=args.model_dtype),
                        "kvlab eval --original")
    if original is None:
        result = evaluate(model, model.tokenizer, docs, seq_len=args.seq_len, stride=args.stride,
                          max_tokens=args.max_tokens, batch_size=args.batch_size, progress=not args.no_progress,
                          backend=args.backend, kv_quant=args.kv_quant)
    else:                           # the same perplexity, and the fidelity, from one pass over the text
        from kvlab.eval.fidelity import compare

        result, fid = compare(original, model, model.tokenizer, docs, seq_len=args.seq_len, stride=args.stride,
                              max_tokens=args.max_tokens, batch_size=args.batch_size, kv_quant=args.kv_quant,
                              backend=args.backend, progress=not args.no_progress)
    out = {"model": str(args.model), "data": args.data, "data_fingerprint": corpus_fingerprint(docs),
           "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token("bf16"), "kv_quant": args.kv_quant,
           "kv_bytes_per_token": model.cfg.kv_bytes_per_token(model.dtype, args.kv_quant), **result.to_dict()}
    if original is not None:
        out["fidelity"] = fid.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model} on {args.data}: perplexity {result.perplexity:.3f}, {result.bits_per_byte:.4f} "
              f"bits/byte, {result.tokens:,} tokens ({result.bytes:,} bytes, {result.documents} documents), "
              f"windows of {result.seq_len} with stride {result.stride}")
        if original is not None:
            f = out["fidelity"]
            print(f"against {args.original}: perplexity ratio {f['perplexity_ratio']:.4f}, KL(original || model) "
                  f"{f['kl']:.4f} nats/token, top-1 agreement {f['top1_agreement']:.1%}")
    return 0

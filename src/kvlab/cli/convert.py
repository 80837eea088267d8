"""``kvlab convert``: fewer KV heads and/or cross-layer KV sharing."""

from __future__ import annotations

import argparse

from kvlab.cli.common import UsageError, load_model, model_args
from kvlab.io import save_checkpoint


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="MHA/GQA -> fewer KV heads and/or cross-layer KV sharing",
                       description="Convert a model's K/V heads by pooling contiguous groups (GQA/MQA) and/or "
                                   "share KV across layers (CLA); writes a kvlab checkpoint with provenance.")
    model_args(p)
    p.add_argument("--kv-heads", type=int, metavar="G", help="new number of KV heads (must divide the current)")
    p.add_argument("--mqa", action="store_true", help="one KV head (same as --kv-heads 1)")
    p.add_argument("--cla", type=int, metavar="K", help="share each producer's KV with the next K-1 layers")
    p.add_argument("--method", choices=["mean", "first", "random", "calibrated"], default="mean",
                   help="mean/first/random pool weights (the GQA paper's ablation); calibrated fits the merged "
                        "K/V heads to the original ones on calibration text, RoPE-aware, queries and output "
                        "projections adjusted")
    p.add_argument("--calibration-tokens", type=int, default=8192, metavar="N",
                   help="--method calibrated: tokens of calibration text (default 8192)")
    p.add_argument("--calibration-data", default="builtin", metavar="DATA",
                   help="--method calibrated: 'builtin' (the built-in corpus's train split), a text file, JSONL or "
                        "a directory of .txt; validation documents are never used")
    p.add_argument("--seed", type=int, default=0, help="seed of --method random and of the calibration windows")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.convert.heads import convert, plan_conversion
    from kvlab.io import load_config

    if args.kv_heads is None and not args.mqa and args.cla is None:
        raise UsageError("kvlab convert: give --kv-heads G, --mqa and/or --cla K")
    if args.kv_heads is not None and args.mqa:
        raise UsageError("kvlab convert: give --kv-heads G or --mqa, not both")
    change = dict(n_kv_head=1 if args.mqa else args.kv_heads, cla=args.cla, method=args.method)
    plan_conversion(load_config(args.model), **change)          # fail before loading any weights
    model = load_model(args)
    before = model.cfg
    if args.method == "calibrated":
        from kvlab.data.windows import calibration_batches

        if model.tokenizer is None:
            raise UsageError(f"kvlab convert: {args.model} has no tokenizer to read calibration text with")
        change["calibration"] = calibration_batches(model.tokenizer, args.calibration_tokens,
                                                    data=args.calibration_data, seed=args.seed)
    new = convert(model, seed=args.seed, **change)
    save_checkpoint(new, args.output)
    print(f"{args.model} -> {args.output}: {before.n_kv_head} -> {new.cfg.n_kv_head} KV heads, "
          f"{before.n_kv_layers} -> {new.cfg.n_kv_layers} KV layers ({args.method}); KV bytes per token (bf16) "
          f"{before.kv_bytes_per_token('bf16'):,} -> {new.cfg.kv_bytes_per_token('bf16'):,}")
    return 0

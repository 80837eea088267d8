"""``kvlab convert``: fewer KV heads and/or cross-layer KV sharing, multi-head latent attention, or
low-rank key/value latents; and keys stored balanced for an integer cache (``--balance-keys``)."""

from __future__ import annotations

import argparse

from kvlab.cli.common import UsageError, add_overwrite, load_model, model_args, seed_arg
from kvlab.errors import ConfigError
from kvlab.io import save_checkpoint


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="MHA/GQA -> fewer KV heads, cross-layer KV sharing, MLA or low-rank K/V",
                       description="Convert a model's K/V heads by pooling contiguous groups (GQA/MQA) and/or "
                                   "share KV across layers (CLA), or convert every layer to multi-head latent "
                                   "attention (--mla), or cache low-rank key and value latents (--k-rank/--v-rank); "
                                   "writes a kvlab checkpoint with provenance.")
    model_args(p)
    p.add_argument("--kv-heads", type=int, metavar="G", help="new number of KV heads (must divide the current)")
    p.add_argument("--mqa", action="store_true", help="one KV head (same as --kv-heads 1)")
    p.add_argument("--cla", type=int, metavar="K", help="share each producer's KV with the next K-1 layers")
    p.add_argument("--cross-kv-heads", type=int, metavar="G",
                   help="an encoder–decoder: new number of cross-attention KV heads (1 = MQA; the GQA paper "
                        "converts the decoder's self- and cross-attention alike)")
    p.add_argument("--cross-cla", type=int, metavar="K",
                   help="an encoder–decoder: share each cross-attention producer's K/V with the next K-1 decoder "
                        "layers (they all attend to the same encoder output)")
    p.add_argument("--mla", type=int, metavar="RANK",
                   help="multi-head latent attention with a latent of RANK channels per token and layer (any "
                        "width; the cache holds RANK + --rope-dim channels); calibrated on calibration text")
    p.add_argument("--rope-dim", type=int, metavar="R",
                   help="--mla: channels of the shared RoPE key (every (head_dim/R)-th frequency keeps RoPE; "
                        "default head_dim/2)")
    p.add_argument("--latent-norm", action="store_true",
                   help="--mla: RMS-normalise the latent as DeepSeek-V3 does (needed to export to transformers)")
    p.add_argument("--k-rank", type=int, metavar="R",
                   help="low-rank K/V (Palu): cache a key latent of R channels per token and layer; the keys are "
                        "rebuilt from it and then rotated, so RoPE is kept whole (give --v-rank too)")
    p.add_argument("--v-rank", type=int, metavar="R",
                   help="low-rank K/V: the value latent's channels (PCA of the calibration keys and values)")
    p.add_argument("--latent-channels", type=int, metavar="N",
                   help="low-rank K/V with N key + value latent channels per layer on average, split across layers "
                        "and between keys and values by each component's estimated effect on the loss (--method "
                        "fisher); instead of --k-rank/--v-rank")
    p.add_argument("--method", default=None,
                   choices=["mean", "first", "random", "calibrated", "pca", "whitened", "fisher"],
                   help="mean/first/random pool weights (the GQA paper's ablation); calibrated fits the merged "
                        "K/V heads to the original ones on calibration text, RoPE-aware, queries and output "
                        "projections adjusted (default: mean); for --mla: pca (default: joint PCA of the "
                        "calibration K/V), whitened (weighted by the queries and the output projection) or fisher "
                        "(in the loss's metric, what kvlab shrink starts from); for --k-rank/--v-rank: pca "
                        "(default) or fisher (errors weighted by the loss's gradient; the default and only choice "
                        "for --latent-channels)")
    p.add_argument("--calibration-tokens", type=int, default=8192, metavar="N",
                   help="--method calibrated, --mla and --refit: tokens of calibration text (default 8192)")
    p.add_argument("--calibration-data", default="builtin", metavar="DATA",
                   help="--method calibrated, --mla and --refit: 'builtin' (the built-in corpus's train split), a "
                        "text file, JSONL or a directory of .txt; validation documents are never used (an "
                        "encoder–decoder: 'builtin', the instruction tasks' train split, or a JSONL of pairs)")
    p.add_argument("--refit", action="store_true",
                   help="after converting, refit every layer's output projection in closed form so that the "
                        "converted attention, on the converted model's own hidden states, reproduces the "
                        "original's attention output on calibration text (layer by layer, in order; a much "
                        "better start for MLA and calibrated conversions)")
    p.add_argument("--balance-keys", action="store_true",
                   help="store the keys centred and balanced against the queries, fitted on calibration text: the "
                        "same outputs, and an int8/int4 cache (--kv-quant) rounds far less of what attention reads "
                        "(SmolLM2 int4-h: +5.0%% -> +1.7%% perplexity); alone, or after a conversion to GQA/MQA/CLA")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of --method random and of the calibration windows")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.convert.heads import convert, plan_conversion
    from kvlab.io import load_config
    from kvlab.io.atomic import check_output, refuse_output_over_input

    check_output(args.output, "kvlab-checkpoint", overwrite=args.overwrite)    # before any work
    refuse_output_over_input(args.output, [args.model])

    lowrank = args.k_rank is not None or args.v_rank is not None or args.latent_channels is not None
    if (args.cross_kv_heads is not None or args.cross_cla is not None) and (args.mla is not None or lowrank):
        raise UsageError("kvlab convert: --cross-kv-heads/--cross-cla pool an encoder–decoder's heads; give them "
                         "without --mla/--k-rank/--v-rank/--latent-channels")
    if args.balance_keys and (args.mla is not None or lowrank):
        raise UsageError("kvlab convert: --balance-keys stores the keys of GQA layers; an MLA or low-rank model caches "
                         "latents (convert first, without it)")
    if args.mla is not None:
        return _run_mla(args, lowrank)
    if lowrank:
        return _run_lowrank(args)
    if args.balance_keys and args.kv_heads is None and not args.mqa and args.cla is None and \
            args.cross_kv_heads is None and args.cross_cla is None:
        return _run_balance(args)
    if args.rope_dim is not None or args.latent_norm:
        raise UsageError("kvlab convert: --rope-dim and --latent-norm go with --mla RANK")
    args.method = args.method or "mean"
    if args.method in ("pca", "whitened", "fisher"):
        raise UsageError(f"kvlab convert: --method {args.method} goes with --mla or low-rank K/V; pooling heads "
                         f"uses mean/first/random/calibrated")
    cross = args.cross_kv_heads is not None or args.cross_cla is not None
    if args.kv_heads is None and not args.mqa and args.cla is None and not cross:
        raise UsageError("kvlab convert: give --kv-heads G, --mqa and/or --cla K (an encoder–decoder also "
                         "--cross-kv-heads G / --cross-cla K), or --mla RANK, or --k-rank R --v-rank R")
    if args.kv_heads is not None and args.mqa:
        raise UsageError("kvlab convert: give --kv-heads G or --mqa, not both")
    change = dict(n_kv_head=1 if args.mqa else args.kv_heads, cla=args.cla, method=args.method,
                  cross_n_kv_head=args.cross_kv_heads, cross_cla=args.cross_cla)
    config = load_config(args.model)
    plan_conversion(config, **change)          # fail before loading any weights
    if config.is_encoder_decoder and args.refit:
        raise UsageError("kvlab convert: --refit fits decoder-only attention outputs; an encoder–decoder is "
                         "converted without it (then uptrained, as the GQA paper did)")
    model = load_model(args)
    before = model.cfg
    calibration = _calibration(args, model) if args.method == "calibrated" or args.refit else None
    if args.method == "calibrated":
        change["calibration"] = calibration
    new = convert(model, seed=args.seed, **change)
    _refit(args, model, new, calibration)
    if args.balance_keys:
        new = _balanced(args, new)
    save_checkpoint(new, args.output, overwrite=args.overwrite)
    print(f"{args.model} -> {args.output}: {before.n_kv_head} -> {new.cfg.n_kv_head} KV heads, "
          f"{before.n_kv_layers} -> {new.cfg.n_kv_layers} KV layers ({args.method}); KV bytes per token (bf16) "
          f"{before.kv_bytes_per_token('bf16'):,} -> {new.cfg.kv_bytes_per_token('bf16'):,}"
          + (f"; cross-attention {before.cross_n_kv_head} -> {new.cfg.cross_n_kv_head} KV heads in "
             f"{len(before.cross_kv_producers)} -> {len(new.cfg.cross_kv_producers)} layers, bytes per source token "
             f"(bf16) {before.cache_bytes('bf16').per_source_token:,} -> "
             f"{new.cfg.cache_bytes('bf16').per_source_token:,}" if before.is_encoder_decoder else ""))
    return 0


def _balanced(args: argparse.Namespace, model):
    """``model`` with its keys balanced on calibration windows of its context, :data:`BALANCE_WINDOW`
    tokens at most."""
    from kvlab.convert.balance import BALANCE_WINDOW, balance_keys
    from kvlab.data.windows import calibration_batches

    if model.tokenizer is None:
        raise UsageError(f"kvlab convert: {args.model} has no tokenizer to read calibration text with")
    if model.cfg.is_encoder_decoder:
        raise UsageError("kvlab convert: --balance-keys fits decoder-only self-attention; an encoder–decoder has none")
    seq_len = min(model.cfg.max_seq_len, BALANCE_WINDOW)
    text = calibration_batches(model.tokenizer, args.calibration_tokens, seq_len=seq_len,
                               batch_size=max(1, 4096 // seq_len), data=args.calibration_data, seed=args.seed)
    try:
        return balance_keys(model, text)
    except ConfigError as e:
        raise UsageError(f"kvlab convert: --balance-keys: {e}") from None


def _run_balance(args: argparse.Namespace) -> int:
    from kvlab.io import load_config

    config = load_config(args.model)
    for flag, given in (("--method", args.method), ("--rope-dim", args.rope_dim), ("--refit", args.refit or None),
                        ("--latent-norm", args.latent_norm or None)):
        if given is not None:
            raise UsageError(f"kvlab convert: --balance-keys alone changes no structure; {flag} goes with a conversion")
    if config.key_balance:
        print(f"kvlab convert: {args.model} already stores its keys balanced; fitting them again")
    new = _balanced(args, load_model(args))
    save_checkpoint(new, args.output, overwrite=args.overwrite)
    print(f"{args.model} -> {args.output}: keys stored centred and balanced against the queries in "
          f"{len([m for m in new.layers if getattr(m.self_attn, 'balanced', False)])} layers (fitted on "
          f"{args.calibration_tokens:,} calibration tokens); outputs unchanged, int8/int4 caches round less "
          f"(--kv-quant int4-h)")
    return 0


def _calibration(args: argparse.Namespace, model):
    from kvlab.data.windows import calibration_batches

    if model.tokenizer is None:
        raise UsageError(f"kvlab convert: {args.model} has no tokenizer to read calibration text with")
    if model.cfg.is_encoder_decoder:
        from kvlab.data.seq2seq import calibration_pairs
        from kvlab.recipes.seq2seq import seq2seq_pairs

        try:
            train_pairs = seq2seq_pairs(args.calibration_data, n_tasks=max(64, args.calibration_tokens // 8))[0]
        except ConfigError as e:
            raise UsageError(f"kvlab convert: --calibration-data: {e}") from None
        return calibration_pairs(train_pairs, model.tokenizer, model.cfg.decoder_start_token_id,
                                 args.calibration_tokens, seed=args.seed)
    return calibration_batches(model.tokenizer, args.calibration_tokens, data=args.calibration_data, seed=args.seed)


def _refit(args: argparse.Namespace, original, new, calibration) -> None:
    if not args.refit:
        return
    from kvlab.convert.refit import refit_outputs

    report = refit_outputs(original, new, calibration)
    before, after = (sum(report[k]) / len(report[k]) for k in ("before", "after"))
    print(f"refitted {len(report['after'])} output projections: relative attention-output error on the calibration "
          f"text {before:.4f} -> {after:.4f} (mean over layers)")


def _fit_and_save(args: argparse.Namespace, plan, convert_fn, change: dict):
    """A conversion fitted on calibration text (MLA, low-rank): checked against the config before any
    weights load, then converted, optionally refitted, and saved; returns (old config, new model)."""
    from kvlab.io import load_config

    before = load_config(args.model)
    plan(before, **change)
    model = load_model(args)
    calibration = _calibration(args, model)
    new = convert_fn(model, calibration=calibration, **change)
    _refit(args, model, new, calibration)
    save_checkpoint(new, args.output, overwrite=args.overwrite)
    return before, new


def _run_mla(args: argparse.Namespace, lowrank: bool) -> int:
    from kvlab.attention.mla import MLAShape
    from kvlab.convert.mla import convert_to_mla, plan_mla

    if args.kv_heads is not None or args.mqa or args.cla is not None or lowrank:
        raise UsageError("kvlab convert: --mla replaces every layer's attention; "
                         "give it without --kv-heads/--mqa/--cla/--k-rank/--v-rank/--latent-channels")
    method = args.method or "pca"
    if method not in ("pca", "whitened", "fisher"):
        raise UsageError(f"kvlab convert: --mla is fitted on calibration text; --method {method} is not one of "
                         f"pca, whitened, fisher")
    change = dict(kv_lora_rank=args.mla, qk_rope_head_dim=args.rope_dim, latent_norm=args.latent_norm, method=method)
    before, new = _fit_and_save(args, plan_mla, convert_to_mla, change)
    shape = MLAShape.of(new.cfg)
    print(f"{args.model} -> {args.output}: MLA, latent {shape.kv_lora_rank} + RoPE key {shape.qk_rope_head_dim} "
          f"channels per layer ({method}); KV bytes per token (bf16) {before.kv_bytes_per_token('bf16'):,} -> "
          f"{new.cfg.kv_bytes_per_token('bf16'):,}")
    return 0


def _run_lowrank(args: argparse.Namespace) -> int:
    from kvlab.attention.lowrank import layer_ranks
    from kvlab.convert.lowrank import check_channels, convert_to_lowrank, plan_lowrank

    if args.latent_channels is not None and (args.k_rank is not None or args.v_rank is not None):
        raise UsageError("kvlab convert: give --latent-channels N (allocated by the loss) or --k-rank R --v-rank R, "
                         "not both")
    if args.latent_channels is None and (args.k_rank is None or args.v_rank is None):
        raise UsageError("kvlab convert: low-rank K/V needs both --k-rank R and --v-rank R (or --latent-channels N)")
    if args.kv_heads is not None or args.mqa:
        raise UsageError("kvlab convert: low-rank K/V compress the K/V heads the model has; convert the heads "
                         "(--kv-heads/--mqa) in a separate run first if you want both")
    if args.cla is not None:
        raise UsageError("kvlab convert: low-rank K/V keep the model's layer sharing; share layers (--cla) in "
                         "a separate run first if you want both")
    if args.rope_dim is not None or args.latent_norm:
        raise UsageError("kvlab convert: --rope-dim and --latent-norm go with --mla RANK; low-rank K/V keep RoPE whole")
    method = args.method or ("fisher" if args.latent_channels is not None else "pca")
    if method not in ("pca", "fisher"):
        raise UsageError(f"kvlab convert: low-rank K/V are fitted by PCA of the calibration keys and values, plain "
                         f"(pca) or weighted by the loss (fisher); --method {method} does not apply")
    if args.latent_channels is not None and method != "fisher":
        raise UsageError("kvlab convert: --latent-channels splits the budget by each component's estimated loss, "
                         "which --method fisher measures; give --k-rank/--v-rank for --method pca")
    if args.latent_channels is not None:
        change = dict(channels=args.latent_channels, method=method)

        def plan(cfg, channels, method):            # the widths are known only after calibration
            check_channels(cfg, channels)
            return plan_lowrank(cfg, k_rank=1, v_rank=1)
    else:
        change = dict(k_rank=args.k_rank, v_rank=args.v_rank, method=method)

        def plan(cfg, k_rank, v_rank, method):
            return plan_lowrank(cfg, k_rank=k_rank, v_rank=v_rank)
    before, new = _fit_and_save(args, plan, convert_to_lowrank, change)
    ranks = [layer_ranks(new.cfg, i) for i in new.cfg.kv_producers]
    ks, vs = [k for k, _ in ranks], [v for _, v in ranks]
    widths = (f"key latent {ks[0]} + value latent {vs[0]} channels per layer" if len(set(ks)) == len(set(vs)) == 1
              else f"key latents {min(ks)}-{max(ks)} + value latents {min(vs)}-{max(vs)} channels "
                   f"({(sum(ks) + sum(vs)) / len(ks):g} per layer on average)")
    print(f"{args.model} -> {args.output}: low-rank K/V, {widths} ({method}); KV bytes per token (bf16) "
          f"{before.kv_bytes_per_token('bf16'):,} -> {new.cfg.kv_bytes_per_token('bf16'):,}")
    return 0

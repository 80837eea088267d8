"""``kvlab train``: pretrain from a config or uptrain a checkpoint (:mod:`kvlab.recipes.pretrain`)."""

from __future__ import annotations

import argparse
import json
import os

from kvlab.cli.common import UsageError, add_overwrite, device_arg, load_model, model_config_from_args, seed_arg
from kvlab.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain from a config, or uptrain a checkpoint",
                       description="Train with AdamW, warm-up + cosine decay, gradient clipping and exact resume "
                                   "from atomic checkpoints. Pretrain a --preset/--config (byte tokenizer) or "
                                   "uptrain --init MODEL, e.g. the output of kvlab convert.")
    src = p.add_argument_group("model (give one)")
    src.add_argument("--preset", metavar="NAME")
    src.add_argument("--config", metavar="FILE")
    src.add_argument("--init", metavar="MODEL", help="a checkpoint to continue training (uptraining)")
    p.add_argument("--n-kv-head", type=int, help="with --preset/--config: override KV heads")
    p.add_argument("--cla", type=int, help="with --preset/--config: override the CLA sharing factor")
    p.add_argument("--cross-n-kv-head", type=int, metavar="N",
                   help="with --preset/--config of an encoder–decoder: override cross-attention's KV heads")
    p.add_argument("--cross-cla", type=int, metavar="K",
                   help="with --preset/--config of an encoder–decoder: share cross-attention K/V across K layers")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: metrics.jsonl, checkpoints/, final/")
    p.add_argument("--data", default="builtin", help="'builtin', a text file, a .jsonl file or a directory of .txt; "
                                                     "for an encoder–decoder 'builtin' (the instruction tasks) or a "
                                                     ".jsonl file of source/target pairs")
    p.add_argument("--data-field", default="text", help="the JSONL field holding the text (default 'text')")
    p.add_argument("--source-field", default="source", help="encoder–decoders: the JSONL field of the source")
    p.add_argument("--target-field", default="target", help="encoder–decoders: the JSONL field of the target")
    budget = p.add_argument_group("budget (give one)")
    budget.add_argument("--max-steps", type=int)
    budget.add_argument("--tokens", type=int, help="training tokens")
    budget.add_argument("--alpha", type=float, help="a fraction of --reference-tokens (uptraining budget)")
    budget.add_argument("--reference-tokens", type=int, help="the pretraining budget --alpha refers to")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--train-only", choices=["all", "attention", "kv"], default="all")
    p.add_argument("--data-mode", choices=["random", "sequential"], default="random")
    p.add_argument("--cache-dir", help="where tokenized data is cached (default ~/.cache/kvlab or $KVLAB_CACHE)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    add_overwrite(p, run=True)
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: DDP, or FSDP2 (fully_shard per block)")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu (default), cuda, cuda:N or mps")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.io.rundir import RunDirectory
    from kvlab.recipes.pretrain import new_byte_level_model, run_training
    from kvlab.training import TrainConfig, steps_for_budget
    from kvlab.training.checkpoints import RESUMABLE_CHANGES, TRAIN_OUTPUTS, run_settings

    sources = [x for x in (args.preset, args.config, args.init) if x]
    if len(sources) != 1:
        raise UsageError("kvlab train: give exactly one of --preset NAME, --config FILE (pretraining) or "
                         "--init MODEL (uptraining a checkpoint)")
    budgets = [b for b, given in (("--max-steps", args.max_steps is not None), ("--tokens", args.tokens is not None),
                                  ("--alpha", args.alpha is not None)) if given]
    if len(budgets) != 1:
        raise UsageError(f"kvlab train: give exactly one budget: --max-steps N, --tokens N, or --alpha A with "
                         f"--reference-tokens N (got {', '.join(budgets) or 'none'})")
    if args.reference_tokens is not None and args.alpha is None:
        raise UsageError("kvlab train: --reference-tokens goes with --alpha (the budget is alpha x reference tokens); "
                         "drop it, or give --alpha instead of " + budgets[0])
    tokens_per_step = args.batch_size * args.seq_len
    max_steps = args.max_steps if args.max_steps is not None else steps_for_budget(
        tokens_per_step, tokens=args.tokens, alpha=args.alpha, reference_tokens=args.reference_tokens)
    cfg = TrainConfig(out_dir=args.out, max_steps=max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
                      eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
                      keep_last=args.keep_last, seed=args.seed, train_only=args.train_only,
                      data_mode=args.data_mode, log_every=args.log_every)
    overrides = [f for f, v in (("--n-kv-head", args.n_kv_head), ("--cla", args.cla),
                                ("--cross-n-kv-head", args.cross_n_kv_head), ("--cross-cla", args.cross_cla))
                 if v is not None]
    if args.init and overrides:
        flag = overrides[0]
        raise UsageError(f"kvlab train: {flag} shapes a new model (--preset/--config); a checkpoint given with --init "
                         f"keeps its wiring — convert it first (kvlab convert {args.init} --kv-heads G / --cla K)")
    if args.init:
        model = load_model(argparse.Namespace(model=args.init, model_dtype=None, device="cpu"))
        if model.tokenizer is None:
            raise UsageError(f"kvlab train: {args.init} has no tokenizer to read the data with")
    else:
        ns = argparse.Namespace(checkpoint=None, preset=args.preset, config=args.config, n_kv_head=args.n_kv_head,
                                cla=args.cla, cross_n_kv_head=args.cross_n_kv_head, cross_cla=args.cross_cla,
                                verb="train")
        try:
            model = new_byte_level_model(model_config_from_args(ns), seed=args.seed)
        except ConfigError as e:
            raise UsageError(f"kvlab train: {e}") from None
    if cfg.seq_len > model.cfg.max_seq_len:
        raise UsageError(f"kvlab train: --seq-len {cfg.seq_len} exceeds the model's max_seq_len "
                         f"{model.cfg.max_seq_len}; train on windows of at most {model.cfg.max_seq_len} tokens")
    from kvlab.io.atomic import refuse_output_over_input

    refuse_output_over_input(args.out, [args.init])
    refuse_output_over_input(args.out, [args.data], what="its data", holds=False)
    record = dict(alpha=args.alpha, reference_tokens=args.reference_tokens) if args.alpha is not None else None
    settings = {"init": args.init, "preset": args.preset, "config": args.config, "n_kv_head": args.n_kv_head,
                "cla": args.cla, "data": args.data, "data_field": args.data_field, "strategy": args.strategy,
                **run_settings(cfg)}
    seq2seq = model.cfg.is_encoder_decoder
    if seq2seq:
        from kvlab.recipes.seq2seq import seq2seq_pairs

        if "RANK" in os.environ:
            raise UsageError("kvlab train: encoder–decoders train in one process for now; run without torchrun")
        try:
            seq2seq_pairs(args.data, source_field=args.source_field, target_field=args.target_field, n_tasks=1)
        except ConfigError as e:
            raise UsageError(f"kvlab train: {e}") from None
        settings.update(cross_n_kv_head=args.cross_n_kv_head, cross_cla=args.cross_cla,
                        source_field=args.source_field, target_field=args.target_field)
    with RunDirectory(args.out, "train", settings, entries=TRAIN_OUTPUTS, resume=args.resume,
                      overwrite=args.overwrite, free=RESUMABLE_CHANGES,
                      scaffolding=("metrics.jsonl", "checkpoints")):
        if seq2seq:
            from kvlab.recipes.seq2seq import run_seq2seq_training

            summary = run_seq2seq_training(model, cfg, data=args.data, source_field=args.source_field,
                                           target_field=args.target_field, device=args.device, resume=args.resume,
                                           record=record)
        else:
            summary = run_training(model, cfg, data=args.data, data_field=args.data_field, cache_dir=args.cache_dir,
                                   device=args.device, strategy=args.strategy, resume=args.resume, record=record)
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        print(json.dumps({"final": summary["final"], **{k: v for k, v in summary.items()
                                                        if k not in ("start_step", "final")}}))
    return 0

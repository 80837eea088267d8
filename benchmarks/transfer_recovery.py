"""Recovery of a converted SmolLM2 by layer-wise attention transfer (the conversion issue's second
stage), from mean-pooled and from calibrated starting points, on the same tokens.

For each starting point: convert, measure validation perplexity (α = 0), train the attention
projections with :class:`kvlab.training.AttentionTransfer` against the original model for
``--steps`` steps of ``--batch-size`` × ``--seq-len`` tokens of the built-in corpus's train split,
and measure again; with ``--kd-steps N``, then distill the logits (:class:`kvlab.training.Distillation`,
the original as the frozen teacher) for N more steps on fresh windows, and measure once more.
Calibration and training text come from the train split only.

    python benchmarks/transfer_recovery.py [--change mqa|cla2|mqa-cla2] [--steps 40] [--kd-steps 0] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import kvlab
from kvlab.convert.heads import convert
from kvlab.data.corpus import builtin_corpus, corpus_fingerprint
from kvlab.data.windows import Windows, calibration_batches, tokenize_to_file
from kvlab.eval.perplexity import evaluate
from kvlab.training import AttentionTransfer, Distillation, TrainConfig, train

CHANGES = {"mqa": dict(n_kv_head=1), "cla2": dict(cla=2), "mqa-cla2": dict(n_kv_head=1, cla=2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--change", choices=list(CHANGES), default="mqa")
    ap.add_argument("--methods", default="mean,calibrated")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--kd-steps", type=int, default=0, help="logit-distillation steps after the transfer")
    ap.add_argument("--kd-lr", type=float, default=1e-4)
    ap.add_argument("--kd-train-only", choices=["attention", "all"], default="attention")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--max-eval-tokens", type=int, default=None, help="cap on scored tokens (default: all)")
    ap.add_argument("--out", default="benchmarks/results/transfer_recovery.json")
    args = ap.parse_args()

    base = kvlab.load(args.model)
    docs = builtin_corpus("validation")
    train_tokens = tokenize_to_file(builtin_corpus("train"), base.tokenizer, progress=False).tokens
    calibration = calibration_batches(base.tokenizer, args.calibration_tokens, seed=0)

    def ppl(model) -> float:
        with torch.no_grad():
            return evaluate(model, base.tokenizer, docs, seq_len=1024, max_tokens=args.max_eval_tokens,
                            progress=False).perplexity

    rows = [{"method": "original", "ppl": ppl(base)}]
    print(f"original: perplexity {rows[0]['ppl']:.2f}", flush=True)
    for method in args.methods.split(","):
        extra = dict(calibration=calibration) if method == "calibrated" else {}
        t0 = time.perf_counter()
        student = convert(base, method=method, **CHANGES[args.change], **extra)
        row = {"method": method, "convert_s": time.perf_counter() - t0, "ppl_alpha0": ppl(student)}
        cfg = TrainConfig(out_dir=tempfile.mkdtemp(), max_steps=args.steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, lr=args.lr, warmup_steps=max(1, args.steps // 10), weight_decay=0.0,
                          eval_every=10**9, save_every=10**9, log_every=10**9, train_only="attention")
        t0 = time.perf_counter()
        train(student, Windows(train_tokens, args.seq_len, args.batch_size, seed=1), None, cfg,
              objective=AttentionTransfer(base), quiet=True)
        row.update(train_s=time.perf_counter() - t0, tokens=args.steps * args.batch_size * args.seq_len,
                   ppl_after=ppl(student))
        rows.append(row)
        print(f"{args.change} {method}: alpha=0 {row['ppl_alpha0']:.2f} -> after {row['tokens']:,} tokens of "
              f"attention transfer ({row['train_s']:.0f} s) {row['ppl_after']:.2f}", flush=True)
        if args.kd_steps:
            kd = TrainConfig(out_dir=tempfile.mkdtemp(), max_steps=args.kd_steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, lr=args.kd_lr, warmup_steps=max(1, args.kd_steps // 10),
                             weight_decay=0.0, eval_every=10**9, save_every=10**9, log_every=10**9,
                             train_only=args.kd_train_only)
            t0 = time.perf_counter()
            train(student, Windows(train_tokens, args.seq_len, args.batch_size, seed=2), None, kd,
                  objective=Distillation(base), quiet=True)
            row.update(kd_s=time.perf_counter() - t0, kd_tokens=args.kd_steps * args.batch_size * args.seq_len,
                       ppl_after_kd=ppl(student))
            print(f"  then {row['kd_tokens']:,} tokens of distillation ({row['kd_s']:.0f} s): "
                  f"{row['ppl_after_kd']:.2f}", flush=True)
    meta = {"model": args.model, "change": args.change, "data_fingerprint": corpus_fingerprint(docs),
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "kd_steps": args.kd_steps, "kd_lr": args.kd_lr, "kd_train_only": args.kd_train_only,
            "calibration_tokens": args.calibration_tokens, "max_eval_tokens": args.max_eval_tokens,
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Distillation's learning rate from a good start: SmolLM2-135M converted to low-rank K/V allocated by
the loss (``channels=N``, α = 0), then distilled from the original (attention weights, one 1,024-token
window of the train split per step, warmup a tenth of the steps) at each learning rate; the held-out
proxy perplexity (4,096 train-split tokens that no step trains on, ``kvlab shrink``'s proxy) every
few steps.

    python benchmarks/distill_lr.py [--lrs 3e-4,1e-4,3e-5,1e-5] [--steps 24] [--channels 192] [--batch-size 1]
        [--out benchmarks/results/distill_lr.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

import kvlab
from kvlab.convert.calibrated import attention_input_moments
from kvlab.convert.lowrank import convert_to_lowrank, kv_loss_moments
from kvlab.data.corpus import builtin_corpus
from kvlab.data.windows import Windows, calibration_batches, tokenize_to_file
from kvlab.eval.perplexity import batch_loss
from kvlab.recipes.shrink import ProxyCurve
from kvlab.training import Distillation, TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lrs", default="3e-4,1e-4,3e-5,1e-5")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--channels", type=int, default=192, help="latent channels per layer (192: KV/2 on SmolLM2)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/distill_lr.json")
    args = ap.parse_args()
    base = kvlab.load(args.model)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    tok = base.tokenizer
    train_tokens = tokenize_to_file(builtin_corpus("train"), tok, progress=False).tokens
    calibration = calibration_batches(tok, 8192, seed=0)
    # the same proxy windows as kvlab shrink's (seed 0)
    xs, ys = Windows(train_tokens, 1024, 4, seed=1_000_003).batch(0)
    proxy = [torch.cat([xs[i:i + 2], ys[i:i + 2, -1:]], 1) for i in range(0, 4, 2)]
    moments = attention_input_moments(base, calibration, [(i, i) for i in base.cfg.kv_producers])
    loss_moments = kv_loss_moments(base, calibration)
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        student = convert_to_lowrank(base, channels=args.channels, moments=moments, loss_moments=loss_moments)
        start = math.exp(batch_loss(student, proxy))
        tokens_per_step = args.batch_size * 1024
        curve = ProxyCurve(student, proxy, max(1, args.steps // 6), 0, tokens_per_step, args.steps, f"lr {lr:g}", print)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            tcfg = TrainConfig(out_dir=tmp, max_steps=args.steps, batch_size=args.batch_size, seq_len=1024, lr=lr,
                               warmup_steps=max(1, args.steps // 10), weight_decay=0.0, eval_every=10**9,
                               save_every=10**9, keep_last=1, log_every=10**9, train_only="attention", seed=2)
            train(student, Windows(train_tokens, 1024, args.batch_size, seed=2), None, tcfg, device="cpu", quiet=True,
                  hooks=curve, objective=Distillation(base))
        rows.append({"lr": lr, "start_proxy_ppl": start, "curve": curve.points, "seconds": time.perf_counter() - t})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"model": args.model, "channels": args.channels, "steps": args.steps, "batch_size": args.batch_size,
            "original_proxy_ppl": math.exp(batch_loss(base, proxy)), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

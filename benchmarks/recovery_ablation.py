"""The conversion issue's ablation on SmolLM2-135M: starting point × recovery objective, the same
training tokens for every cell, validation perplexity after.

Starting points: MQA by mean pooling (the GQA paper's), MQA by calibrated merging, MLA (latent 160
+ RoPE key 32, KV/2) by PCA, that MLA followed by the output refit (``kvlab.convert.refit``), and
low-rank K/V latents fitted and allocated by the loss at the same bytes (``kvlab shrink``'s start
since 2026-11-30; ``--kd-lr 3e-5`` is the rate it distils at).
Objectives on the training loop: ``lm`` (the language-model loss on all
weights: the papers' uptraining), ``transfer`` (layer-wise attention transfer, attention weights),
``kd`` (logit distillation from the original, attention weights), ``transfer+kd`` (30 % / 70 % of
the tokens, what ``kvlab shrink`` does). A cell may name what distillation trains as a third field
(``START:OBJECTIVE:attention|all|lora``, as ``kvlab shrink --train``; default attention; transfer
always trains the attention, lm all weights). Windows of ``--seq-len`` tokens from the train split;
perplexity on ``--eval-tokens`` of the validation split at 1,024 tokens of context.

    python benchmarks/recovery_ablation.py [--steps 24] [--cells "MQA mean:lm;..."] [--out FILE.json]
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
from kvlab.convert.calibrated import attention_input_moments, needed_moments
from kvlab.convert.heads import convert
from kvlab.convert.lowrank import convert_to_lowrank, kv_loss_moments
from kvlab.convert.mla import convert_to_mla
from kvlab.convert.refit import refit_outputs
from kvlab.data.corpus import builtin_corpus, corpus_fingerprint
from kvlab.data.windows import Windows, calibration_batches, tokenize_to_file
from kvlab.eval.perplexity import evaluate
from kvlab.peft.lora import LoraConfig, apply_lora, merge_and_unload
from kvlab.training import AttentionTransfer, CrossEntropy, Distillation, TrainConfig, train

STARTS = ("MQA mean", "MQA calibrated", "MLA 160+32 pca", "MLA 160+32 pca+refit", "Low-rank 192 allocated")
OBJECTIVES = ("lm", "transfer", "kd", "transfer+kd")
TRAIN_SETS = ("attention", "all", "lora")
DEFAULT_CELLS = ("MQA mean:lm;MQA mean:transfer+kd;MQA calibrated:lm;MQA calibrated:transfer+kd;"
                 "MLA 160+32 pca:lm;MLA 160+32 pca:transfer;MLA 160+32 pca:kd;MLA 160+32 pca:transfer+kd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per cell (batch 1 x --seq-len tokens)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--cells", default=DEFAULT_CELLS, help="';'-separated START:OBJECTIVE pairs")
    ap.add_argument("--kd-lr", type=float, default=1e-4, help="distillation's learning rate (kvlab shrink: 3e-5)")
    ap.add_argument("--out", default="benchmarks/results/recovery_ablation.json")
    args = ap.parse_args()
    base = kvlab.load(args.model)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    tok = base.tokenizer
    docs = builtin_corpus("validation")
    train_tokens = tokenize_to_file(builtin_corpus("train"), tok, progress=False).tokens
    calibration = calibration_batches(tok, 8192, seed=0)
    mqa = base.cfg.replace(n_kv_head=1)
    moments = attention_input_moments(base, calibration, needed_moments(base.cfg, mqa))

    loss_moments = {}

    def start(name: str):
        if name == "Low-rank 192 allocated":
            if not loss_moments:
                loss_moments.update(kv_loss_moments(base, calibration))
            return convert_to_lowrank(base, channels=192, moments=moments, loss_moments=loss_moments)
        if name == "MQA mean":
            return convert(base, n_kv_head=1, method="mean")
        if name == "MQA calibrated":
            return convert(base, n_kv_head=1, method="calibrated", calibration=calibration, moments=moments)
        model = convert_to_mla(base, kv_lora_rank=160, qk_rope_head_dim=32, calibration=calibration, moments=moments)
        if name.endswith("+refit"):
            refit_outputs(base, model, calibration)
        return model

    def ppl(model) -> float:
        with torch.no_grad():
            return evaluate(model, tok, docs, seq_len=1024, max_tokens=args.eval_tokens, progress=False).perplexity

    def run(model, objective, steps: int, lr: float, train_only: str, seed: int) -> None:
        if steps < 1:
            return
        cfg = TrainConfig(out_dir=tempfile.mkdtemp(), max_steps=steps, batch_size=1, seq_len=args.seq_len, lr=lr,
                          warmup_steps=max(1, steps // 10), weight_decay=0.0, eval_every=10**9, save_every=10**9,
                          log_every=10**9, train_only=train_only)
        train(model, Windows(train_tokens, args.seq_len, 1, seed=seed), None, cfg, objective=objective, quiet=True)

    rows = [{"start": "original", "objective": "-", "kv_bytes_per_token_bf16": base.cfg.kv_bytes_per_token(),
             "perplexity": ppl(base)}]
    print(f"original: {rows[0]['perplexity']:.3f}", flush=True)
    alpha0: dict[str, float] = {}
    for cell in args.cells.split(";"):
        start_name, objective, train_set = ([s.strip() for s in cell.split(":")] + ["attention"])[:3]
        if start_name not in STARTS or objective not in OBJECTIVES or train_set not in TRAIN_SETS:
            raise SystemExit(f"unknown cell {cell!r}: starts {STARTS}, objectives {OBJECTIVES}, trains {TRAIN_SETS}")
        t0 = time.perf_counter()
        model = start(start_name)
        if start_name not in alpha0:
            alpha0[start_name] = ppl(model)
        n_transfer = {"transfer": args.steps, "transfer+kd": round(0.3 * args.steps)}.get(objective, 0)
        n_kd = {"kd": args.steps, "transfer+kd": args.steps - round(0.3 * args.steps)}.get(objective, 0)
        run(model, AttentionTransfer(base), n_transfer, 3e-4, "attention", 1)
        if train_set == "lora" and n_kd:
            apply_lora(model, LoraConfig(r=16, alpha=32.0, target_modules=("gate_proj", "up_proj", "down_proj")))
        run(model, Distillation(base), n_kd, args.kd_lr, "attention+adapter" if train_set == "lora" else train_set, 2)
        if train_set == "lora" and n_kd:
            merge_and_unload(model)
        run(model, CrossEntropy(), args.steps if objective == "lm" else 0, 1e-4, "all", 3)
        rows.append({"start": start_name, "objective": objective, "kd_trains": train_set,
                     "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token(),
                     "alpha0_perplexity": alpha0[start_name], "tokens": args.steps * args.seq_len,
                     "perplexity": ppl(model), "seconds": time.perf_counter() - t0})
        print(f"{start_name:16} {objective:12} {train_set:9} alpha0 {alpha0[start_name]:10.2f} -> "
              f"{rows[-1]['perplexity']:8.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    meta = {"model": args.model, "data_fingerprint": corpus_fingerprint(docs), "steps": args.steps,
            "seq_len": args.seq_len, "eval_tokens": args.eval_tokens,
            "lr": {"transfer": 3e-4, "kd": args.kd_lr, "lm": 1e-4},
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

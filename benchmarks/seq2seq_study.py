"""The GQA paper's figure at small scale: an encoder–decoder pretrained as MHA on the built-in
instruction tasks, its decoder converted to GQA/MQA (self- and cross-attention alike, mean pooling,
and cross-attention shared across decoder layers), uptrained for α of the pretraining steps, and each
variant's task accuracy against its decode time per sample.

1. pretrain a T5-shaped byte-level model (MHA everywhere) on the built-in tasks' train split;
2. for each variant and conversion method (``mean``, the GQA paper's; ``calibrated``, fitted on 8k
   tokens of the train split's pairs): convert (``kvlab.convert.heads.convert``), evaluate at α = 0,
   uptrain ``α × steps`` steps (``--uptrain-lr``, by default where pretraining's schedule ended — its
   final 10 % of the peak —, 10 % warm-up, cosine decay), evaluate again; the MHA model gets the same
   extra steps as a control;
3. evaluation: exact-match accuracy of greedy targets on the 200 held-out tasks (their own seed) and
   target perplexity; time per sample of that greedy generation (batch 32, short targets), and of a
   long synthetic decode (random byte sources of ``--decode-source`` tokens, ``--decode-new`` new
   tokens each, batch ``--decode-batch``, no stop), where the cache the decoder reads each step is
   large enough for its size to matter; cache bytes per sample.

    python benchmarks/seq2seq_study.py [--steps 2000] [--alpha 0.05] [--work runs/seq2seq_study]
        [--out benchmarks/results/seq2seq_study.json]

The pretrained model is kept in ``--work`` (a rerun reuses it); checkpoints stay there, the numbers go
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
import warnings
from pathlib import Path

import torch

import kvlab
from kvlab import ModelConfig
from kvlab.convert.heads import convert
from kvlab.data.seq2seq import calibration_pairs
from kvlab.eval.seq2seq import exact_match, target_loss
from kvlab.inference.seq2seq import generate_seq2seq
from kvlab.recipes.pretrain import new_byte_level_model
from kvlab.recipes.seq2seq import run_seq2seq_training, seq2seq_pairs
from kvlab.training import TrainConfig

# name -> (self-attention KV heads, cross-attention KV heads, cross-attention sharing factor)
VARIANTS = {"MHA": (8, 8, 1), "GQA-4": (4, 4, 1), "GQA-2": (2, 2, 1), "MQA": (1, 1, 1),
            "GQA-2 cross-CLA3": (2, 2, 3), "MQA cross-CLA3": (1, 1, 3)}


def train_config(out: Path, steps: int, args, warmup: int, lr: float) -> TrainConfig:
    return TrainConfig(out_dir=str(out), max_steps=steps, batch_size=args.batch_size, seq_len=64, lr=lr,
                       warmup_steps=warmup, eval_every=max(1, steps // 4), eval_batches=7, save_every=steps,
                       keep_last=1, seed=args.seed, log_every=max(1, steps // 10))


def evaluate(model, val_pairs, args) -> dict:
    loss = target_loss(model, val_pairs, model.tokenizer)
    match = exact_match(model, val_pairs, model.tokenizer, max_new_tokens=16, batch_size=32)
    cost = model.cfg.cache_bytes("bf16")
    return {"accuracy": match["accuracy"], "per_task": match["per_task"], "target_perplexity": loss["perplexity"],
            "task_seconds_per_sample": match["seconds_per_sample"],
            "cache_bytes_per_sample_bf16": cost.for_sequence(args.decode_new + 1, args.decode_source),
            "kv_bytes_per_token_bf16": cost.per_token, "cross_bytes_per_source_token_bf16": cost.per_source_token}


def _decode_only(model, memory, n_new: int) -> None:
    """Greedy decoding of ``n_new`` tokens from an encoded source: the cross-attention K/V projected
    once, then one decoder step per token (what a converted decoder changes)."""
    B = memory.hidden.shape[0]
    cache = model.new_cache(B, n_new + 1)
    tokens = torch.full((B, 1), model.cfg.decoder_start_token_id, dtype=torch.long)
    logits = model(None, tokens, memory=memory, cache=cache)[:, -1]
    for _ in range(n_new - 1):
        logits = model(None, logits.argmax(-1, keepdim=True), cache=cache)[:, -1]


def time_decode(models: dict, args, rounds: int = 7) -> dict:
    """Seconds per sample, for each model, of a whole generation (``total``: encoder and decoder) and
    of its decoder alone (``decode``: from an encoded source — only the decoder is converted), each the
    best of ``rounds`` rounds that visit the models in turn (so a slow spell of the machine does not
    land on one variant)."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (args.decode_batch, args.decode_source), generator=g)
    sources = src.tolist()
    best = {key: {"total": float("inf"), "decode": float("inf")} for key in models}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")          # 1,024-token sources pass the 512 the model trained at
        memories = {key: model.encode(src) for key, model in models.items()}
        for model in models.values():
            generate_seq2seq(model, sources[:2], 4, stop_tokens=[])            # warm-up
        for _ in range(rounds):
            for key, model in models.items():
                t0 = time.perf_counter()
                generate_seq2seq(model, sources, args.decode_new, stop_tokens=[])
                t1 = time.perf_counter()
                _decode_only(model, memories[key], args.decode_new)
                t2 = time.perf_counter()
                best[key] = {"total": min(best[key]["total"], t1 - t0), "decode": min(best[key]["decode"], t2 - t1)}
    return {key: {part: seconds / args.decode_batch for part, seconds in b.items()} for key, b in best.items()}


def run_directory(work: Path, variant: str, method: str) -> Path:
    return work / f"uptrain-{variant.replace(' ', '-')}-{method}"


def add_decode_times(rows: list[dict], args) -> None:
    """Time each wiring once (the methods of one variant share its architecture: their decode costs the
    same), interleaved, and print the figure's two axes."""
    first = {}
    for row in rows:
        first.setdefault(row["variant"], row)
    seconds = time_decode({name: kvlab.load(row["checkpoint"]) for name, row in first.items()}, args)
    for row in rows:
        s = seconds[row["variant"]]
        row["long_generation_seconds_per_sample"] = s["total"]
        row["decoder_seconds_per_sample"] = s["decode"]
        for stale in ("long_decode_seconds_per_sample", "encoder_seconds_per_sample"):
            row.pop(stale, None)
        print(f"{row['variant']:>18} {row['method']:>10}: accuracy {row['uptrained']['accuracy']:.1%}, "
              f"{s['total'] * 1e3:.2f} ms per sample ({s['decode'] * 1e3:.2f} decoding)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000, help="pretraining steps of the MHA model")
    ap.add_argument("--alpha", type=float, default=0.05, help="uptraining steps as a fraction of --steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--uptrain-lr", type=float, default=3e-4,
                    help="peak learning rate of uptraining (default 3e-4: where pretraining's cosine ended; restarting "
                         "at the pretraining peak, 3e-3, made even the MHA control worse: 15.5 -> 11.5 %%)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of " + ", ".join(VARIANTS))
    ap.add_argument("--methods", default="mean,calibrated")
    ap.add_argument("--decode-source", type=int, default=1024)
    ap.add_argument("--decode-new", type=int, default=64)
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/seq2seq_study", help="checkpoints and training runs")
    ap.add_argument("--out", default="benchmarks/results/seq2seq_study.json")
    ap.add_argument("--timing-only", action="store_true",
                    help="re-time the checkpoints a finished run left in --work and update --out")
    args = ap.parse_args()
    if args.timing_only:
        torch.set_num_threads(args.threads)
        result = json.loads(Path(args.out).read_text())
        for row in result["rows"]:
            row["checkpoint"] = str(run_directory(Path(args.work), row["variant"], row["method"]) / "final")
            for stage in ("alpha_0", "uptrained"):
                row[stage].pop("long_decode_seconds_per_sample", None)
        add_decode_times(result["rows"], args)
        result["decode"] = {"source_tokens": args.decode_source, "new_tokens": args.decode_new,
                            "batch": args.decode_batch}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    _, val_pairs = seq2seq_pairs("builtin", n_tasks=1)
    cfg = ModelConfig.from_preset("t5-tiny", d_model=128, n_head=8, n_layer=3, n_encoder_layer=3, d_ff=256)
    pretrained = out / "mha" / "final"
    timing = out / "pretrain_seconds.json"           # kept beside the model a rerun reuses
    if not pretrained.is_dir():
        t0 = time.perf_counter()
        model = new_byte_level_model(cfg, seed=args.seed)
        shutil.rmtree(out / "mha", ignore_errors=True)
        run_seq2seq_training(model, train_config(out / "mha", args.steps, args, 100, args.lr), evaluate=False)
        timing.write_text(json.dumps(time.perf_counter() - t0))
    pretrain_seconds = json.loads(timing.read_text()) if timing.is_file() else None
    base = kvlab.load(pretrained)
    up_steps = max(1, round(args.alpha * args.steps))
    train_pairs = seq2seq_pairs("builtin", n_tasks=4000)[0]
    calibration = calibration_pairs(train_pairs, base.tokenizer, base.cfg.decoder_start_token_id, 8192)
    rows = []
    for name in args.variants.split(","):
        heads, cross_heads, cross_cla = VARIANTS[name]
        for method in (["none"] if name == "MHA" else args.methods.split(",")):
            converted = kvlab.load(pretrained) if name == "MHA" else convert(
                base, n_kv_head=heads, cross_n_kv_head=cross_heads, cross_cla=cross_cla, method=method,
                calibration=calibration if method == "calibrated" else None)
            row = {"variant": name, "method": method, "n_kv_head": heads, "cross_n_kv_head": cross_heads,
                   "cross_cla": cross_cla, "alpha_0": evaluate(converted, val_pairs, args)}
            run_dir = run_directory(out, name, method)
            shutil.rmtree(run_dir, ignore_errors=True)
            t1 = time.perf_counter()
            run_seq2seq_training(converted, train_config(run_dir, up_steps, args, max(1, up_steps // 10),
                                                         args.uptrain_lr), evaluate=False, quiet=True)
            row["uptrain_seconds"] = time.perf_counter() - t1
            row["uptrained"] = evaluate(converted, val_pairs, args)
            row["checkpoint"] = str(run_dir / "final")
            rows.append(row)
            a0, up = row["alpha_0"], row["uptrained"]
            print(f"{name:>18} {method:>10}: accuracy {a0['accuracy']:.1%} -> {up['accuracy']:.1%}, target ppl "
                  f"{a0['target_perplexity']:.3f} -> {up['target_perplexity']:.3f}, cache "
                  f"{up['cache_bytes_per_sample_bf16']:,} B/sample", flush=True)
    add_decode_times(rows, args)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": args.threads, "pretrain_steps": args.steps, "uptrain_steps": up_steps, "alpha": args.alpha,
              "batch_size": args.batch_size, "lr": args.lr, "uptrain_lr": args.uptrain_lr,
              "pretrain_seconds": pretrain_seconds,
              "model": cfg.to_dict(), "params": cfg.param_counts()["total"], "decode": {
                  "source_tokens": args.decode_source, "new_tokens": args.decode_new, "batch": args.decode_batch},
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Long-context behaviour at small scale: perplexity against position up to 4x the training length
(the ALiBi and StreamingLLM papers' plots).

Trains tiny byte-level models from scratch on the built-in corpus's train split, all with the same
data, steps and seed, at ``--seq-len`` tokens: RoPE with full attention, ALiBi with full attention,
RoPE with a sliding window of ``--window``, and linear attention (elu+1 features, RetNet decay).
Then scores validation windows of 4x the training
length and reports perplexity per quarter of the window (positions [0, T), [T, 2T), ...), for those
three and for the RoPE full-attention model run with a window at inference — without sinks
(StreamingLLM's "window attention", whose rolling cache evicts the first tokens) and with
``--sinks`` attention sinks, seen at their original positions and at their places in the cache
(StreamingLLM's positions).

    python benchmarks/long_context.py [--steps 400] [--seq-len 128] [--out benchmarks/results/long_context.json]
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
import torch.nn.functional as F

from kvlab import ModelConfig
from kvlab.data.corpus import builtin_corpus, corpus_fingerprint
from kvlab.data.windows import Windows, tokenize_to_file
from kvlab.inference.streaming import with_window
from kvlab.recipes.pretrain import new_byte_level_model
from kvlab.training import TrainConfig, train


def per_position_nll(model, tokens, length: int, n_windows: int) -> torch.Tensor:
    """Mean next-token loss at each position 0..length-2 over ``n_windows`` validation windows."""
    windows = Windows(tokens, length, 1, mode="sequential")
    total = torch.zeros(length)
    with torch.no_grad():
        for i in range(n_windows):
            x, y = windows.batch(i)
            logits = model(x).float()
            total += F.cross_entropy(logits[0], y[0], reduction="none")
    return total / n_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--out", default="benchmarks/results/long_context.json")
    args = ap.parse_args()
    T = args.seq_len
    base = dict(d_model=128, n_layer=4, n_head=4, n_kv_head=4, max_seq_len=T)
    trained = {"rope": dict(pos="rope"), "alibi": dict(pos="alibi"), "rope, window": dict(sliding_window=args.window),
               "linear (elu+1, RetNet decay)": dict(attention_layers=[{"kind": "linear", "decay": "retnet"}] * 4)}
    probe = new_byte_level_model(ModelConfig.from_preset("tiny", **base))
    train_tokens = tokenize_to_file(builtin_corpus("train"), probe.tokenizer, progress=False).tokens
    docs = builtin_corpus("validation")
    val_tokens = tokenize_to_file(docs, probe.tokenizer, progress=False).tokens
    rows, models = [], {}
    for name, change in trained.items():
        t0 = time.perf_counter()
        model = new_byte_level_model(ModelConfig.from_preset("tiny", **base, **change), seed=0)
        cfg = TrainConfig(out_dir=tempfile.mkdtemp(), max_steps=args.steps, batch_size=args.batch_size, seq_len=T,
                          lr=3e-3, warmup_steps=args.steps // 10, eval_every=10**9, save_every=10**9,
                          log_every=10**9, seed=0)
        train(model, Windows(train_tokens, T, args.batch_size, seed=0), None, cfg, quiet=True)
        model.eval()
        models[name] = model
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    # The full-attention RoPE model run with a window at inference (its weights, another wiring).
    full = models["rope"]
    models[f"rope, window {args.window} at inference"] = with_window(full, args.window).eval()
    models[f"rope, window {args.window} + {args.sinks} sinks at inference (original positions)"] = with_window(
        full, args.window, args.sinks, "original").eval()
    models[f"rope, window {args.window} + {args.sinks} sinks at inference (cache positions)"] = with_window(
        full, args.window, args.sinks, "cache").eval()
    for name, model in models.items():
        nll = per_position_nll(model, val_tokens, 4 * T, args.eval_windows)
        quarters = [math.exp(float(nll[q * T:(q + 1) * T].mean())) for q in range(4)]
        rows.append({"model": name, "ppl_by_quarter": quarters, "nll_by_position": nll.tolist()})
        print(f"{name:40} " + "  ".join(f"{p:7.3f}" for p in quarters), flush=True)
    meta = {"steps": args.steps, "seq_len": T, "batch_size": args.batch_size, "window": args.window,
            "sinks": args.sinks, "eval_windows": args.eval_windows, "model": base,
            "data_fingerprint": corpus_fingerprint(docs), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    smooth = 16
    for r in rows:
        nll = torch.tensor(r["nll_by_position"])
        curve = nll[: (len(nll) // smooth) * smooth].view(-1, smooth).mean(1).exp()
        ax.plot(torch.arange(len(curve)) * smooth + smooth / 2, curve, label=r["model"])
    ax.axvline(T, color="gray", ls=":", lw=1)
    ax.set(xlabel="position in the window (tokens)", ylabel="perplexity (16-token bins)", yscale="log",
           title=f"tiny byte-level models trained at {T} tokens, scored up to {4 * T}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()

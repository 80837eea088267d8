"""StreamingLLM on a real model: SmolLM2-135M (trained at 8,192 tokens) scored on one long text with
full attention and with a window at inference — without sinks, and with sinks at their original
positions or at their places in the cache.

The text is the built-in corpus's validation split, documents concatenated (each after a BOS
token), cut to ``--length`` tokens. Every model reads it in chunks of ``--chunk`` tokens through its
KV cache, as a long generation would (a windowed model's rolling cache holds sinks + window entries
per layer whatever the length), and the next-token loss of every position is kept. Reports
perplexity per bucket of positions, the cache's bytes per sequence, and writes JSON and a plot.

    python benchmarks/streaming_smollm2.py [--length 16384] [--window 1024] [--sinks 4]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kvlab
from kvlab.data.corpus import builtin_corpus, corpus_fingerprint
from kvlab.inference.streaming import with_window


@torch.no_grad()
def per_position_nll(model, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """Loss of predicting tokens[1:] from each prefix, reading the text chunk by chunk through the cache."""
    cache = model.new_cache(1, len(tokens))
    losses = []
    for start in range(0, len(tokens) - 1, chunk):
        piece = tokens[start:start + chunk + 1]
        logits = model(piece[None, :-1], cache=cache)[0]
        losses.append(F.cross_entropy(logits.float(), piece[1:], reduction="none"))
    return torch.cat(losses), cache.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--bucket", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/streaming_smollm2.json")
    args = ap.parse_args()

    base = kvlab.load(args.model).eval()
    tok = base.tokenizer
    docs = builtin_corpus("validation")
    ids: list[int] = []
    for d in docs:
        ids += [base.cfg.bos_token_id] + tok.encode(d.text)
    if len(ids) < args.length:
        raise SystemExit(f"the validation split has {len(ids)} tokens; use --length <= {len(ids)}")
    tokens = torch.tensor(ids[:args.length])
    W, S = args.window, args.sinks
    models = {
        "full attention": base,
        f"window {W}": with_window(base, W),
        f"window {W} + {S} sinks, original positions": with_window(base, W, S, "original"),
        f"window {W} + {S} sinks, cache positions (StreamingLLM)": with_window(base, W, S, "cache"),
    }
    rows = []
    for name, model in models.items():
        t0 = time.perf_counter()
        nll, nbytes = per_position_nll(model, tokens, args.chunk)
        buckets = [math.exp(float(nll[i:i + args.bucket].mean())) for i in range(0, len(nll), args.bucket)]
        rows.append({"model": name, "ppl_by_bucket": buckets, "cache_bytes": nbytes,
                     "seconds": time.perf_counter() - t0, "nll_by_position": nll.tolist()})
        print(f"{name:55} cache {nbytes / 2**20:8.1f} MiB  " + " ".join(f"{p:6.2f}" for p in buckets), flush=True)
    meta = {"model": args.model, "length": args.length, "window": W, "sinks": S, "chunk": args.chunk,
            "bucket": args.bucket, "trained_context": base.cfg.max_seq_len,
            "data_fingerprint": corpus_fingerprint(docs), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        ax.plot([(i + 0.5) * args.bucket for i in range(len(r["ppl_by_bucket"]))], r["ppl_by_bucket"], marker=".",
                label=r["model"])
    ax.axvline(base.cfg.max_seq_len, color="gray", ls=":", lw=1)
    ax.set(xlabel="position (tokens)", ylabel=f"perplexity ({args.bucket}-token buckets)", yscale="log",
           title=f"{args.model} (trained at {base.cfg.max_seq_len}) on {args.length} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()

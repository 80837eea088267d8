"""What ``kvlab shrink --quick`` produces, as a snapshot to compare two source trees: does a change
keep the recipe's behaviour? (Issue 32's refactor was checked this way.)

A tiny byte-level model is trained (80 steps, seeded) and shrunk in five settings; for each, the
snapshot holds ``results.json`` without its timings and paths, a SHA-256 of the chosen model's
weights, and its config. Run on one thread so that the arithmetic is the same in both runs:

    OMP_NUM_THREADS=1 PYTHONPATH=/old/tree/src python benchmarks/shrink_quick_snapshot.py --out /tmp/snap-old
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/shrink_quick_snapshot.py --out /tmp/snap-new
    python benchmarks/shrink_quick_snapshot.py --compare /tmp/snap-old /tmp/snap-new
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

CASES = {"refit2": ["--refit", "--candidates", "2"], "default": [], "lora": ["--train", "lora"],
         "kv3": ["--kv", "3x", "--candidates", "3"], "generated": ["--data", "mixed", "--generated-tokens", "256"]}
# Timings and paths differ between any two runs.
DROP = {"elapsed_s", "eval_s", "chat_s", "proxy_s", "started", "timing", "model"}


def _scrub(x):
    if isinstance(x, dict):
        return {k: _scrub(v) for k, v in x.items() if k not in DROP}
    if isinstance(x, list):
        return [_scrub(v) for v in x]
    return x


def snapshot(out: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from kvlab import ModelConfig
    from kvlab.cli import main
    from kvlab.data.corpus import builtin_corpus
    from kvlab.data.windows import Windows, tokenize_to_file
    from kvlab.io import save_checkpoint
    from kvlab.recipes.pretrain import new_byte_level_model
    from kvlab.training import TrainConfig, train

    torch.manual_seed(0)
    work = out / "work"
    model = new_byte_level_model(ModelConfig.from_preset("tiny", max_seq_len=256))
    tokens = tokenize_to_file(builtin_corpus("train"), model.tokenizer, cache_dir=work, progress=False).tokens
    cfg = TrainConfig(out_dir=str(work / "run"), max_steps=80, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=8,
                      eval_every=10**9, save_every=10**9, log_every=10**9)
    train(model, Windows(tokens, 64, 16, seed=0), None, cfg, quiet=True)
    save_checkpoint(model, work / "model")
    for name, extra in CASES.items():
        o = work / f"out-{name}"
        t = time.time()
        kv = [] if "--kv" in extra else ["--kv", "2x"]
        assert main(["shrink", str(work / "model"), "--quick", *kv, *extra, "-o", str(o)]) == 0
        res = _scrub(json.loads((o / "results.json").read_text()))
        weights = load_file(str(o / "model" / "model.safetensors"))
        h = hashlib.sha256()
        for k in sorted(weights):
            h.update(k.encode())
            h.update(weights[k].float().numpy().tobytes())
        res["model_sha256"] = h.hexdigest()
        res["model_config"] = json.loads((o / "model" / "config.json").read_text())["model"]
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, sort_keys=True, default=str))
        print(f"{name}: {time.time() - t:.0f} s, chose {res['best']}", flush=True)


def _diff(x, y, path=""):
    if isinstance(x, dict) and isinstance(y, dict):
        out = [f"{path}/{k}: only in {'the first' if k in x else 'the second'}" for k in sorted(set(x) ^ set(y))]
        return out + [d for k in sorted(set(x) & set(y)) for d in _diff(x[k], y[k], f"{path}/{k}")]
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [d for i, (u, v) in enumerate(zip(x, y)) for d in _diff(u, v, f"{path}[{i}]")]
    return [] if x == y else [f"{path}: {str(x)[:60]} != {str(y)[:60]}"]


def _load(path: Path) -> dict:
    """A snapshot with its model config read by this tree's ModelConfig, so that a config written in
    an older schema (kind settings as top-level fields) compares by meaning, not by layout."""
    from kvlab import ModelConfig

    snap = json.loads(path.read_text())
    snap["model_config"] = ModelConfig.from_dict(snap["model_config"]).to_dict()
    return snap


def compare(a: Path, b: Path) -> int:
    differences = 0
    for name in CASES:
        d = _diff(_load(a / f"{name}.json"), _load(b / f"{name}.json"))
        differences += len(d)
        print(f"{name}: {'identical' if not d else f'{len(d)} differences'}")
        for line in d:
            print("   ", line)
    return 1 if differences else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write a snapshot into this directory")
    ap.add_argument("--compare", type=Path, nargs=2, metavar="DIR", help="compare two snapshots")
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if not args.out:
        ap.error("give --out DIR or --compare A B")
    snapshot(args.out)

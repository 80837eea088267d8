"""Issue 41's targets on a finished ``kvlab shrink`` run: its chosen model against the original on every
off-domain set, passkey retrieval up to the trained context and the next-line and recall tasks, at
sizes the run's own report does not spend time on (``kvlab eval --original``; one code path with it).

    .venv/bin/python benchmarks/trust_suite.py runs/shrink-4x [--task-items 200] [--passkey-trials 1]

Writes ``benchmarks/results/trust/<run>.json`` (the command's JSON, with the run's chosen candidate) and
prints the rows BENCHMARKS quotes. Targets (issue 41, SmolLM2-135M): at 4x an off-domain perplexity
ratio <= 1.06 on every set, top-1 agreement >= 85 %, passkey equal to the original's at every length and
depth, task scores within 2 points of the original's; at 8x a ratio <= 1.15 and passkey equal.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

from kvlab.cli import main as kvlab

RESULTS = Path(__file__).parent / "results" / "trust"


def run(run_dir: Path, *, original: str, task_items: int, passkey_trials: int, offdomain_tokens: int) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    best = next(r for r in results["recovered"] if r["name"] == results["best"])
    argv = ["eval", str(run_dir / "model"), "--original", original, "--data", "offdomain", "--max-tokens",
            str(offdomain_tokens), "--passkey", "--passkey-trials", str(passkey_trials), "--tasks", "next-line,recall",
            "--task-items", str(task_items), "--no-progress", "--json"]
    if best["precision"]:
        argv += ["--kv-quant", best["precision"]]
    buffer, t = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(buffer):
        code = kvlab(argv)
    if code:
        raise SystemExit(f"kvlab {' '.join(argv)} failed ({code})")
    out = json.loads(buffer.getvalue())
    out.update(run=str(run_dir), candidate=best["name"], precision=best["precision"],
               kv_bytes=best["kv_bytes"], original_kv_bytes=results["original"]["kv_bytes"],
               validation=best.get("fidelity"), seconds=time.perf_counter() - t, command="kvlab " + " ".join(argv))
    return out


def rows(out: dict) -> list[str]:
    suite, orig = out["suite"], out["original_suite"]
    smaller = out["original_kv_bytes"] / out["kv_bytes"]
    lines = [f"{out['candidate']} ({smaller:.1f}x), off-domain: " + "; ".join(
        f"{name} ratio {d['perplexity_ratio']:.3f}, KL {d['kl']:.4f}, top-1 {d['top1_agreement']:.1%}"
        for name, d in suite["domains"].items())]
    theirs = orig["passkey"]["by_length"]
    lines.append("passkey by length: " + ", ".join(
        f"{n}: {v:.0%} (original {theirs[n]:.0%})" for n, v in suite["passkey"]["by_length"].items()))
    cells = [(v, orig["passkey"]["by_cell"][n][d]) for n, cell in suite["passkey"]["by_cell"].items()
             for d, v in cell.items()]
    equal = sum(a == b for a, b in cells)
    lines.append(f"passkey (length, depth) cells equal to the original's: {equal} of {len(cells)}")
    for name, score in suite["tasks"].items():
        theirs = orig["tasks"][name]["accuracy"]
        lines.append(f"{name}: {score['accuracy']:.1%} (original {theirs:.1%}, n={score['n']})")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--original", default="smollm2-135m")
    p.add_argument("--task-items", type=int, default=200)
    p.add_argument("--passkey-trials", type=int, default=1)
    p.add_argument("--offdomain-tokens", type=int, default=4096)
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for run_dir in args.runs:
        out = run(run_dir, original=args.original, task_items=args.task_items, passkey_trials=args.passkey_trials,
                  offdomain_tokens=args.offdomain_tokens)
        (RESULTS / f"{run_dir.name}.json").write_text(json.dumps(out, indent=2) + "\n")
        print("\n".join(rows(out)))


if __name__ == "__main__":
    main()

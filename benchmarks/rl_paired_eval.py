"""Paired exact-match evaluation of post-training stages on more held-out tasks than the pipeline's
100: the merged SFT model and the same model with each later stage's LoRA adapter answer the same
tasks greedily, and McNemar's exact test on the tasks where they disagree says whether a stage's
gain over SFT is more than chance.

    python benchmarks/rl_paired_eval.py --work /tmp/kvlab-rl-XXXX [--grpo-work /tmp/kvlab-rl-YYYY] \\
        [--adapter NAME=DIR ...] [--n 500] [--out benchmarks/results/rl_paired_eval.json]

``--work`` is a work folder of ``benchmarks/rl_pipeline.py`` (its ``sft-model`` and the stages'
``adapter`` folders); ``--grpo-work`` another one whose ``grpo`` stage ran from that SFT model
(``rl_pipeline.py --sft-model``); ``--adapter`` any other adapter of that SFT model. Stages
already in ``--out`` (for the same ``--n``) are kept and not evaluated again.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from kvlab.data.instruct import make_tasks
from kvlab.eval.tasks import greedy_replies, task_accuracy
from kvlab.io import load
from kvlab.peft.adapter import load_adapter


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``b`` tasks only the stage solves, ``c`` only SFT solves."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--grpo-work")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", default="benchmarks/results/rl_paired_eval.json")
    args = ap.parse_args()
    work = Path(args.work)
    tasks = make_tasks(args.n, 1_000_003)          # the pipeline's held-out seed: its 100 are the first 100
    stages = {"dpo + sft term (RPO, weight 1)": work / "dpo-rpo" / "adapter", "dpo": work / "dpo" / "adapter"}
    if args.grpo_work:
        stages["grpo"] = Path(args.grpo_work) / "grpo" / "adapter"
    for item in args.adapter:
        name, _, directory = item.partition("=")
        stages[name] = Path(directory)
    results: dict = {"n": args.n, "stages": {}}
    if Path(args.out).is_file() and json.loads(Path(args.out).read_text()).get("n") == args.n:
        results = json.loads(Path(args.out).read_text())
    t0 = time.perf_counter()
    sft = load(work / "sft-model")
    tok = sft.tokenizer
    base_replies = greedy_replies(sft, tok, tasks)
    base = task_accuracy(sft, tok, tasks, replies=base_replies)
    base_ok = [r == c[-1]["content"].strip() for r, c in zip(base_replies, tasks)]
    results["sft"] = {"accuracy": base["accuracy"], "per_task": base["per_task"]}
    print("sft", json.dumps(results["sft"]), flush=True)
    for name, adapter in stages.items():
        if not adapter.is_dir() or name in results["stages"]:
            continue
        model = load(work / "sft-model")
        load_adapter(model, adapter)
        replies = greedy_replies(model, tok, tasks)
        acc = task_accuracy(model, tok, tasks, replies=replies)
        ok = [r == c[-1]["content"].strip() for r, c in zip(replies, tasks)]
        only_stage = sum(o and not b for o, b in zip(ok, base_ok))
        only_sft = sum(b and not o for o, b in zip(ok, base_ok))
        row = {"accuracy": acc["accuracy"], "per_task": acc["per_task"], "only_stage_correct": only_stage,
               "only_sft_correct": only_sft, "mcnemar_p": mcnemar_exact(only_stage, only_sft), "adapter": str(adapter)}
        results["stages"][name] = row
        print(name, json.dumps(row), flush=True)
    results["meta"] = {"seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                       "python": platform.python_version(), "threads": torch.get_num_threads(),
                       "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

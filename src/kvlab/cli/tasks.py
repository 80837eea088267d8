"""``kvlab tasks``: write the built-in instruction set."""

from __future__ import annotations

import argparse
import json

from kvlab.cli.common import add_overwrite, seed_arg


def add_parser(sub) -> None:
    p = sub.add_parser("tasks", help="write the built-in instruction set (train/test chat JSONL and preference pairs)",
                       description="Deterministic chat tasks with checkable answers: addition, upper-casing, "
                                   "sorting, date formatting, maximum; as chat (SFT, evaluation) and as preference "
                                   "pairs (correct answer chosen, a plausible wrong one rejected: reward models, DPO).")
    p.add_argument("out", metavar="DIR")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=seed_arg, default=0)
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.data.instruct import write_task_files

    paths = write_task_files(args.out, n_train=args.train, n_test=args.test, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0

"""A small instruction set with checkable answers, and exact-match task accuracy.

Five deterministic task families (a seed fixes every example): two-digit addition, upper-casing
a phrase, sorting three numbers, reformatting a date, and the largest of four numbers. Each
example is a chat conversation whose last message is the assistant's answer, so the same JSONL
file trains SFT (:mod:`kvlab.data.chat`) and, held out, measures accuracy: the model is greedily
continued from the conversation without its answer and scores when its reply, stripped, equals
the answer exactly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from kvlab.errors import ConfigError

WORDS = ("red", "blue", "green", "apple", "river", "stone", "cloud", "paper", "light", "music", "table", "garden",
         "silver", "window", "forest", "candle", "orange", "bridge", "winter", "planet")
TASKS = ("add", "upper", "sort", "date", "max")
SYSTEM = "Answer with the result only."


def _example(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "upper":
        phrase = " ".join(rng.sample(WORDS, 2))
        return f"Write '{phrase}' in capital letters.", phrase.upper()
    if kind == "sort":
        xs = rng.sample(range(1, 100), 3)
        return f"Sort from smallest to largest: {', '.join(map(str, xs))}", ", ".join(map(str, sorted(xs)))
    if kind == "date":
        y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
        return f"Rewrite the date {y}-{m:02d}-{d:02d} as DD/MM/YYYY.", f"{d:02d}/{m:02d}/{y}"
    if kind == "max":
        xs = rng.sample(range(1, 100), 4)
        return f"Which is the largest: {', '.join(map(str, xs))}?", str(max(xs))
    raise ConfigError(f"unknown task {kind!r}; tasks are {list(TASKS)}")


def make_tasks(n: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> list[list[dict]]:
    """``n`` conversations (system, user, assistant), cycling through ``tasks``."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n={n!r} must be a positive integer")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        question, answer = _example(tasks[i % len(tasks)], rng)
        out.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                    {"role": "assistant", "content": answer}])
    return out


def write_task_files(directory: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0, *,
                     overwrite: bool = False) -> dict[str, Path]:
    """``train.jsonl`` and ``test.jsonl`` (disjoint seeds) in a new directory ``directory``
    (written atomically; an existing one replaced only under :mod:`kvlab.io.atomic`'s policy)."""
    from kvlab.io.atomic import write_dir_atomically

    directory = Path(directory)
    splits = (("train", n_train, seed), ("test", n_test, seed + 1_000_003))

    def fill(tmp: Path) -> None:
        for split, n, s in splits:
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in make_tasks(n, s)))

    write_dir_atomically(directory, fill, kind="tasks", overwrite=overwrite)
    return {split: directory / f"{split}.jsonl" for split, _, _ in splits}


def task_kind(question: str) -> str:
    """The task family of a question (add, upper, sort, date, max, other)."""
    for prefix, kind in (("What is", "add"), ("Write", "upper"), ("Sort", "sort"), ("Rewrite", "date"),
                         ("Which", "max")):
        if question.startswith(prefix):
            return kind
    return "other"

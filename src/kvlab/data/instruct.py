"""A small instruction set with checkable answers, and exact-match task accuracy.

Five deterministic task families (a seed fixes every example): two-digit addition, upper-casing
a phrase, sorting three numbers, reformatting a date, and the largest of four numbers. Each
example is a chat conversation whose last message is the assistant's answer, so the same JSONL
file trains SFT (:mod:`kvlab.data.chat`) and, held out, measures accuracy: the model is greedily
continued from the conversation without its answer and scores when its reply, stripped, equals
the answer exactly. The same examples as preference pairs (:func:`make_preference_tasks`): the
correct answer chosen, a plausible wrong one rejected.
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


def _wrong_answer(kind: str, question: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: the mistake a model half-way there makes (off by one or ten, the
    wrong case, the wrong order, day and month swapped, the runner-up)."""
    import re

    if kind == "add":
        return str(int(answer) + rng.choice((-10, -1, 1, 10)))
    if kind == "upper":
        return answer.lower() if rng.random() < 0.5 else answer.title()
    if kind == "sort":
        return ", ".join(answer.split(", ")[::-1])
    if kind == "date":
        d, m, y = answer.split("/")
        return f"{m}/{d}/{y}" if d != m else f"{y}-{m}-{d}"
    if kind == "max":
        return str(sorted(int(x) for x in re.findall(r"\d+", question))[-2])
    raise ConfigError(f"unknown task {kind!r}; tasks are {list(TASKS)}")


def make_preference_tasks(n: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> list[dict]:
    """``n`` preference pairs in TRL's conversational format: the task's prompt (system, user), the
    correct answer chosen and a plausible wrong one rejected — reward models and DPO, offline."""
    rng = random.Random(seed + 7)
    out = []
    for conversation in make_tasks(n, seed, tasks):
        question, answer = conversation[1]["content"], conversation[2]["content"]
        wrong = _wrong_answer(task_kind(question), question, answer, rng)
        out.append({"prompt": conversation[:2], "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": wrong}]})
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
            (tmp / f"preferences_{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in make_preference_tasks(n, s)))

    write_dir_atomically(directory, fill, kind="tasks", overwrite=overwrite)
    files = {split: directory / f"{split}.jsonl" for split, _, _ in splits}
    files.update({f"preferences_{split}": directory / f"preferences_{split}.jsonl" for split, _, _ in splits})
    return files


def task_kind(question: str) -> str:
    """The task family of a question (add, upper, sort, date, max, other)."""
    for prefix, kind in (("What is", "add"), ("Write", "upper"), ("Sort", "sort"), ("Rewrite", "date"),
                         ("Which", "max")):
        if question.startswith(prefix):
            return kind
    return "other"

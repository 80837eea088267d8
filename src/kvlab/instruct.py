"""A small instruction set with checkable answers, and exact-match task accuracy.

Five deterministic task families (a seed fixes every example): two-digit addition, upper-casing
a phrase, sorting three numbers, reformatting a date, and the largest of four numbers. Each
example is a chat conversation whose last message is the assistant's answer, so the same JSONL
file trains SFT (:mod:`kvlab.sft`) and, held out, measures accuracy: the model is greedily
continued from the conversation without its answer and scores when its reply, stripped, equals
the answer exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

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


def write_task_files(directory: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, Path]:
    """``train.jsonl`` and ``test.jsonl`` (disjoint seeds) under ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1_000_003)):
        path = directory / f"{split}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps({"messages": c}) + "\n" for c in make_tasks(n, s)))
        tmp.replace(path)
        paths[split] = path
    return paths


def task_accuracy(model, tokenizer, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int = 16,
                  batch_size: int = 16, backend: str | None = None) -> dict:
    """Exact-match accuracy of greedy replies against each conversation's last (assistant) message."""
    from kvlab.generation import generate

    stop = [t for t in {tokenizer.eos_token_id, model.cfg.eos_token_id} if t is not None]
    correct, per_task, samples = 0, {}, []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True) for c in chunk]
        outs = generate(model, prompts, max_new_tokens, stop_tokens=stop, backend=backend)
        for c, out in zip(chunk, outs):
            reply = tokenizer.decode([t for t in out if t not in stop], skip_special_tokens=True).strip()
            ok = reply == c[-1]["content"].strip()
            correct += ok
            kind = _kind(c[1]["content"])
            hit, total = per_task.get(kind, (0, 0))
            per_task[kind] = (hit + ok, total + 1)
            if len(samples) < 5:
                samples.append({"question": c[1]["content"], "expected": c[-1]["content"], "reply": reply})
    return {"accuracy": correct / len(conversations), "n": len(conversations),
            "per_task": {k: h / t for k, (h, t) in sorted(per_task.items())}, "samples": samples}


def _kind(question: str) -> str:
    for prefix, kind in (("What is", "add"), ("Write", "upper"), ("Sort", "sort"), ("Rewrite", "date"),
                         ("Which", "max")):
        if question.startswith(prefix):
            return kind
    return "other"

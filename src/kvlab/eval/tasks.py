"""Exact-match accuracy of greedy chat replies on instruction tasks (:mod:`kvlab.data.instruct`)."""

from __future__ import annotations

from collections.abc import Sequence

from kvlab.data.instruct import task_kind
from kvlab.inference.generation import generate


def greedy_replies(model, tokenizer, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int = 16,
                   batch_size: int = 16, backend: str | None = None, kv_quant=None) -> list[str]:
    """The greedy reply of ``model`` to each conversation without its last (assistant) message
    (``kv_quant``: generated with the KV cache in that format)."""
    stop = [t for t in {tokenizer.eos_token_id, model.cfg.eos_token_id} if t is not None]
    replies = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True) for c in chunk]
        outs = generate(model, prompts, max_new_tokens, stop_tokens=stop, backend=backend, kv_quant=kv_quant)
        replies += [tokenizer.decode([t for t in out if t not in stop], skip_special_tokens=True).strip()
                    for out in outs]
    return replies


def task_accuracy(model, tokenizer, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int = 16,
                  batch_size: int = 16, backend: str | None = None, replies: Sequence[str] | None = None) -> dict:
    """Exact-match accuracy of greedy replies against each conversation's last (assistant) message
    (``replies``: the greedy replies, if generated already)."""
    if replies is None:
        replies = greedy_replies(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, backend=backend)
    return exact_match_scores([(c[1]["content"], c[-1]["content"]) for c in conversations], replies)


def exact_match_scores(items: Sequence[tuple[str, str]], replies: Sequence[str], question: str = "question") -> dict:
    """Exact-match accuracy of ``replies`` against each ``(question, expected)`` item (both stripped),
    per built-in task family, with the first five as samples (their question under ``question``)."""
    correct, per_task, samples = 0, {}, []
    for (asked, expected), reply in zip(items, replies):
        ok = reply == expected.strip()
        correct += ok
        kind = task_kind(asked)
        hit, total = per_task.get(kind, (0, 0))
        per_task[kind] = (hit + ok, total + 1)
        if len(samples) < 5:
            samples.append({question: asked, "expected": expected, "reply": reply})
    return {"accuracy": correct / len(items), "n": len(items),
            "per_task": {k: h / t for k, (h, t) in sorted(per_task.items())}, "samples": samples}

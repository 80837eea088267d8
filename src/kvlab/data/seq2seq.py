"""Source → target pairs for an encoder–decoder, and their batches.

Pairs come from a JSONL file (``{"source": "...", "target": "..."}`` per line; other field names
with ``source_field``/``target_field``, or chat lines ``{"messages": [...]}``, whose non-assistant
turns are the source and last assistant turn the target), or from the built-in instruction tasks
(:mod:`kvlab.data.instruct`: the question is the source, the answer the target).

Tokens, as T5 makes them: the source's tokens then EOS; the target's tokens then EOS, which the
decoder learns to emit; the decoder's input is ``decoder_start_token_id`` followed by the target
shifted right (teacher forcing). A batch is ``(src, src_mask, tgt_in, labels)``, each
``(batch_size, len)``, right-padded, ``labels`` ``IGNORE_INDEX`` on padding; batch ``i`` is a pure
function of ``(seed, i)`` (:func:`~kvlab.data.chat.epoch_indices`), so a resumed run sees exactly the
batches it would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvlab.data.chat import IGNORE_INDEX, epoch_indices, jsonl_records
from kvlab.data.instruct import make_tasks
from kvlab.errors import ConfigError

Pair = tuple[str, str]


def pair_from_conversation(messages: Sequence[dict]) -> Pair:
    """A chat conversation as a pair: its user (and earlier) turns, joined by newlines, as the source
    (the system prompt left out), its last assistant turn as the target."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ConfigError("a conversation used as a source/target pair must end with an assistant message")
    source = "\n".join(m["content"] for m in messages[:-1] if m.get("role") != "system")
    return source, messages[-1]["content"]


def task_pairs(n: int, seed: int = 0) -> list[Pair]:
    """``n`` built-in instruction tasks as (question, answer) pairs."""
    return [pair_from_conversation(c) for c in make_tasks(n, seed)]


def read_pairs(path: str | Path, source_field: str = "source", target_field: str = "target") -> list[Pair]:
    """Pairs of a JSONL file: ``source_field``/``target_field`` strings, or chat ``messages``."""
    pairs = []
    shape = f'{{"{source_field}": "...", "{target_field}": "..."}} or {{"messages": [...]}}'
    for where, record in jsonl_records(path, "the source/target file", shape):
        if isinstance(record, dict) and "messages" in record and source_field not in record:
            try:
                pairs.append(pair_from_conversation(record["messages"]))
            except (ConfigError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{where}: messages must be a list of {{role, content}} turns ending with the "
                                  f"assistant's") from None
            continue
        if not isinstance(record, dict) or not all(isinstance(record.get(f), str)
                                                   for f in (source_field, target_field)):
            raise ConfigError(f"{where}: expected {shape} with string values")
        pairs.append((record[source_field], record[target_field]))
    if not pairs:
        raise ConfigError(f"{path} holds no pairs; give one {shape} per line")
    return pairs


def encode_text(tokenizer, text: str) -> list[int]:
    """The tokens of ``text`` followed by the tokenizer's EOS (T5's inputs and targets both end so)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@dataclass
class Seq2SeqBatches:
    """Batches ``(src, src_mask, tgt_in, labels)`` of ``pairs`` for a model whose targets begin with
    ``decoder_start``; sources and targets longer than ``max_source``/``max_target`` tokens are cut
    (counted in ``stats``)."""

    pairs: Sequence[Pair]
    tokenizer: object
    decoder_start: int
    batch_size: int
    max_source: int = 512
    max_target: int = 128
    seed: int = 0
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConfigError("no source/target pairs to train on")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad rows with")
        self.rows, cut = [], 0
        for source, target in self.pairs:
            s, t = encode_text(self.tokenizer, source), encode_text(self.tokenizer, target)
            cut += len(s) > self.max_source or len(t) > self.max_target
            self.rows.append((s[:self.max_source], t[:self.max_target]))
        self.stats = {"pairs": len(self.rows), "truncated": int(cut),
                      "source_tokens": sum(len(s) for s, _ in self.rows),
                      "target_tokens": sum(len(t) for _, t in self.rows)}

    def __len__(self) -> int:
        return len(self.rows)

    def indices(self, i: int) -> np.ndarray:
        return epoch_indices(i, self.batch_size, len(self.rows), self.seed)

    def collate(self, rows: Sequence[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
        S, T = max(len(s) for s, _ in rows), max(len(t) for _, t in rows)
        src = torch.full((len(rows), S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), S), dtype=torch.long)
        tgt_in = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, (s, t) in enumerate(rows):
            src[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            tgt_in[r, :len(t)] = torch.tensor([self.decoder_start] + t[:-1])
            labels[r, :len(t)] = torch.tensor(t)
        return src, mask, tgt_in, labels

    def batch(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.collate([self.rows[r] for r in self.indices(i)])

    def all_batches(self) -> list[tuple[torch.Tensor, ...]]:
        """Every pair once, in order (evaluation)."""
        return [self.collate(self.rows[i:i + self.batch_size]) for i in range(0, len(self.rows), self.batch_size)]


def calibration_pairs(pairs: Sequence[Pair], tokenizer, decoder_start: int, n_tokens: int, *, batch_size: int = 16,
                      seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Batches of pairs drawn in a seeded order until they hold ``n_tokens`` source and target tokens
    (the calibration of an encoder–decoder's conversion)."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    chosen, total = [], 0
    for i in order:
        source, target = pairs[int(i)]
        chosen.append(pairs[int(i)])
        total += len(encode_text(tokenizer, source)) + len(encode_text(tokenizer, target))
        if total >= n_tokens:
            break
    return Seq2SeqBatches(chosen, tokenizer, decoder_start, batch_size).all_batches()


class SequentialBatches:
    """Batch ``i`` of some fixed batches, cycling (a validation set for the training loop)."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, ...]]):
        self.batches = list(batches)

    def batch(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.batches[i % len(self.batches)]

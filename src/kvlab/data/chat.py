"""Supervised fine-tuning data: chat conversations -> token rows with loss on assistant tokens only.

Input is JSONL, one conversation per line: ``{"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}, ...]}`` (multi-turn: every assistant turn is learned). Each conversation is
rendered with the model's own chat template. Which tokens are the assistant's is found by rendering
the conversation up to each assistant turn twice — with the generation prompt (what the model is
shown) and with the turn itself (what it must produce) — and taking the difference; that works for
any template that renders a conversation's prefix as a prefix of its rendering, and a template that
does not is rejected by name rather than trained on wrong labels.

Rows are ``seq_len`` tokens, inputs and next-token targets, targets ``-100`` outside assistant
turns and on padding. Without packing a row holds one conversation (right-padded); with packing,
conversations are placed first-fit into rows and a segment id per token keeps them from attending
to each other (positions restart in each). Batch ``i`` is a pure function of ``(seed, i)``, so a
resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvlab.errors import ConfigError

# Targets with this value carry no loss (PyTorch's cross_entropy default ignore_index).
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


def jsonl_records(path: str | Path, what: str, shape: str) -> list[tuple[str, object]]:
    """``(where, record)`` for every non-blank line of a JSONL file (``where``: ``path:line``, for
    messages); a missing file, a directory or a line that is not JSON is one clear error naming
    ``what`` the file should hold and the ``shape`` of a line."""
    from kvlab.data.corpus import read_utf8

    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"{what} {path} {state}; give a JSONL file with one {shape} per line")
    out = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n} is not valid JSON ({e.msg})") from None
    return out


def epoch_indices(i: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Item indices of batch ``i`` over ``n`` items: consecutive slices of a fresh permutation per
    epoch (seeded by ``(seed, epoch)``), so a batch is a pure function of ``(seed, i)``."""
    flat = i * batch_size + np.arange(batch_size)
    perms: dict[int, np.ndarray] = {}
    out = np.empty(batch_size, dtype=np.int64)
    for k, f in enumerate(flat):
        epoch, at = divmod(int(f), n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out[k] = perms[epoch][at]
    return out


def read_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Conversations from a chat JSONL file, validated (errors name the line)."""
    conversations = []
    for where, record in jsonl_records(path, "chat data", "{\"messages\": [...]}"):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{where} has no \"messages\" list; each line must be {{\"messages\": [{{\"role\": "
                              f"..., \"content\": ...}}, ...]}}")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: message {m!r} needs a role in {list(ROLES)} and a string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where} has no assistant message, so nothing to learn from it")
        conversations.append(messages)
    if not conversations:
        raise ConfigError(f"{path} holds no conversations")
    return conversations


def read_chat_data(spec: str, seed: int = 0) -> list[list[dict]]:
    """Conversations from ``--data``: a chat JSONL file, a directory or glob of them (every ``.jsonl``,
    in path order), or a weighted mix (``sft/:0.8,extra.jsonl:0.2``, parsed as
    :func:`kvlab.data.sources.parse_data` parses text mixes). In a mix each part gives its weight's share
    of the total number of conversations: a small part repeats (whole passes, then a sample), a large
    one is sampled, drawn from ``seed``; without weights the parts' conversations come as they are."""
    import random

    from kvlab.data.sources import data_files, parse_data

    parts = parse_data(spec, named=())
    per_part = []
    for part in parts:
        files = data_files(part.source)
        jsonl = [f for f, _ in files if f.suffix == ".jsonl"] if len(files) > 1 or Path(part.source).is_dir() \
            else [f for f, _ in files]
        if not jsonl:
            raise ConfigError(f"--data {part.source!r} holds no .jsonl file of chat records")
        per_part.append([c for f in jsonl for c in read_chat_jsonl(f)])
    if parts[0].weight is None:
        return [c for convs in per_part for c in convs]
    total, rng, out = sum(map(len, per_part)), random.Random(seed), []
    for part, convs in zip(parts, per_part):
        want = max(1, round(part.weight * total))
        whole, rest = divmod(want, len(convs))
        out += convs * whole + rng.sample(convs, rest)
    rng.shuffle(out)
    return out


def encode_chat(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and, per token, whether it is an assistant token."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    learn = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else []
        upto = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if ids[:len(upto)] != upto or upto[:len(prompt)] != prompt:
            raise ConfigError("this chat template does not render a conversation's beginning as the beginning of its "
                              "rendering, so assistant tokens cannot be located; use a prefix-stable template "
                              "(ChatML-style, as SmolLM2/Qwen/Llama-3 have)")
        for j in range(len(prompt), len(upto)):
            learn[j] = True
    return ids, learn


def example_pair(ids: list[int], learn: list[bool], max_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Inputs and targets of one conversation (at most ``max_len`` of each), or None when
    truncation leaves no assistant token."""
    ids, learn = ids[:max_len + 1], learn[:max_len + 1]
    x = np.asarray(ids[:-1], dtype=np.int64)
    y = np.where(np.asarray(learn[1:], dtype=bool), np.asarray(ids[1:], dtype=np.int64), IGNORE_INDEX)
    return (x, y) if (y != IGNORE_INDEX).any() else None


@dataclass
class ChatBatches:
    """Batches ``(x, y)`` — with ``pack=True`` ``(x, y, segment_ids)`` — of ``(batch_size, seq_len)``."""

    conversations: Sequence[Sequence[dict]]
    tokenizer: object
    seq_len: int
    batch_size: int
    pack: bool = False
    seed: int = 0
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad rows with")
        pairs, truncated, dropped = [], 0, 0
        for messages in self.conversations:
            ids, learn = encode_chat(self.tokenizer, messages)
            truncated += len(ids) - 1 > self.seq_len
            pair = example_pair(ids, learn, self.seq_len)
            if pair is None:
                dropped += 1
            else:
                pairs.append(pair)
        if not pairs:
            raise ConfigError(f"no conversation keeps an assistant token within seq_len={self.seq_len}; "
                              "raise --seq-len")
        self.rows = self._pack(pairs) if self.pack else [[p] for p in pairs]
        self.stats = {"conversations": len(self.conversations), "used": len(pairs), "truncated": int(truncated),
                      "dropped": dropped, "rows": len(self.rows),
                      "assistant_tokens": int(sum((p[1] != IGNORE_INDEX).sum() for p in pairs)),
                      "tokens": int(sum(len(p[0]) for p in pairs))}

    def _pack(self, pairs):
        """First-fit decreasing: longest conversations first, each into the first row with room."""
        order = sorted(range(len(pairs)), key=lambda i: (-len(pairs[i][0]), i))
        rows, room = [], []
        for i in order:
            n = len(pairs[i][0])
            for r, free in enumerate(room):
                if free >= n:
                    rows[r].append(pairs[i])
                    room[r] -= n
                    break
            else:
                rows.append([pairs[i]])
                room.append(self.seq_len - n)
        return rows

    def _row(self, parts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        y = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        seg = np.zeros(self.seq_len, dtype=np.int64)
        at = 0
        for s, (px, py) in enumerate(parts, 1):
            x[at:at + len(px)], y[at:at + len(px)], seg[at:at + len(px)] = px, py, s
            at += len(px)
        return x, y, seg

    def indices(self, i: int) -> np.ndarray:
        """Row indices of batch ``i`` (:func:`epoch_indices`)."""
        return epoch_indices(i, self.batch_size, len(self.rows), self.seed)

    def batch(self, i: int):
        rows = [self._row(self.rows[r]) for r in self.indices(i)]
        x, y, seg = (torch.from_numpy(np.stack(c)) for c in zip(*rows))
        return (x, y, seg) if self.pack else (x, y)

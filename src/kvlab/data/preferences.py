"""Preference data (reward models, DPO): pairs of completions of one prompt, the chosen and the rejected.

Input is JSONL in TRL's preference formats, one pair per line:

- standard: ``{"prompt": "text", "chosen": "text", "rejected": "text"}`` — the prompt and the
  completions are plain text, tokenized apart, each completion ending in EOS (as TRL does);
- conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`` — the
  prompt is rendered with the model's chat template and its generation prompt, and each completion
  is what the template adds for the assistant message(s) (their end-of-turn token included);
- implicit prompt: ``{"chosen": ..., "rejected": ...}`` only (text or messages) — the prompt is
  their longest common beginning (for messages: the shared leading messages).

Each pair becomes two rows, ``prompt + chosen`` and ``prompt + rejected``, right-padded to the
longest row of the batch (at most ``seq_len`` tokens: prompts lose their beginning first, then
completions their end, and the counts say so). A batch of ``B`` pairs is ``(tokens (B, 2, T),
attention_mask, completion_mask, pair_ids (B,))`` — pairs first, so the training loop's
micro-batches split whole pairs; :func:`as_rows` gives the ``(2B, T)`` rows with the chosen ones
first, TRL's layout — and batch ``i`` is a pure function of ``(seed, i)``, so a resumed run sees
the batches it would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvlab.data.chat import ROLES, epoch_indices, jsonl_records
from kvlab.errors import ConfigError


@dataclass(frozen=True)
class PreferencePair:
    """Token ids of a prompt and of its chosen and rejected completions."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


def read_preference_jsonl(path: str | Path) -> list[dict]:
    """Records of a preference JSONL file, validated (errors name the line and the format)."""
    records = []
    for where, record in jsonl_records(path, "preference data", "{\"prompt\", \"chosen\", \"rejected\"}"):
        _check_record(record, where)
        records.append(record)
    if not records:
        raise ConfigError(f"{path} holds no preference pairs")
    return records


def _check_record(record, where: str) -> None:
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ConfigError(f"{where} needs \"chosen\" and \"rejected\" (and usually \"prompt\"), as text or as chat "
                          f"messages (TRL's preference format)")
    fields = [record[k] for k in ("prompt", "chosen", "rejected") if k in record]
    texts = all(isinstance(f, str) for f in fields)
    def is_message(m) -> bool:
        return isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)

    chats = all(isinstance(f, list) and f and all(is_message(m) for m in f) for f in fields)
    if not (texts or chats):
        raise ConfigError(f"{where}: prompt, chosen and rejected must all be text or all be lists of {{\"role\", "
                          f"\"content\"}} messages with roles in {list(ROLES)}")


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_preference(tokenizer, record: dict) -> PreferencePair:
    """One record as token ids (see the module docstring for the formats)."""
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str):
        prompt = record.get("prompt")
        if prompt is None:                     # implicit prompt: the shared beginning of the two texts
            n = _common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        p = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        eos = getattr(tokenizer, "eos_token_id", None)

        def text_completion(text: str) -> tuple[int, ...]:       # ends in EOS, as TRL makes it end
            ids = tokenizer.encode(text, add_special_tokens=False)
            return tuple(ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids)

        return PreferencePair(tuple(p), text_completion(chosen), text_completion(rejected))
    prompt = record.get("prompt")
    if prompt is None:
        n = _common_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    p = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)

    def completion(messages) -> tuple[int, ...]:
        full = tokenizer.apply_chat_template([*prompt, *messages], add_generation_prompt=False)
        if full[:len(p)] != p:
            raise ConfigError("this chat template does not render the prompt as the beginning of the conversation, "
                              "so the completion cannot be located; use a prefix-stable template (ChatML-style)")
        return tuple(full[len(p):])

    return PreferencePair(tuple(p), completion(chosen), completion(rejected))


@dataclass
class PreferenceBatches:
    """Step-determined batches of preference pairs (see the module docstring)."""

    pairs: Sequence[PreferencePair]
    pad_id: int
    seq_len: int
    batch_size: int
    seed: int = 0
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConfigError("no preference pairs to train on")
        kept, truncated = [], 0
        for pair in self.pairs:
            fitted = fit_pair(pair, self.seq_len)
            if fitted is None:
                continue
            truncated += fitted != pair
            kept.append(fitted)
        if not kept:
            raise ConfigError(f"no pair keeps a completion token within seq_len={self.seq_len}; raise --seq-len")
        self.rows = kept
        self.stats = {"pairs": len(self.pairs), "used": len(kept), "truncated": truncated,
                      "dropped": len(self.pairs) - len(kept)}

    def indices(self, i: int) -> np.ndarray:
        """Pair indices of batch ``i`` (:func:`~kvlab.data.chat.epoch_indices`)."""
        return epoch_indices(i, self.batch_size, len(self.rows), self.seed)

    def batch(self, i: int) -> tuple[torch.Tensor, ...]:
        idx = self.indices(i)
        return collate_pairs([self.rows[j] for j in idx], self.pad_id) + (torch.from_numpy(idx),)

    def all_batches(self) -> list[tuple[torch.Tensor, ...]]:
        """Every pair once, in order, in batches of ``batch_size`` (evaluation)."""
        out = []
        for start in range(0, len(self.rows), self.batch_size):
            idx = np.arange(start, min(start + self.batch_size, len(self.rows)))
            out.append(collate_pairs([self.rows[j] for j in idx], self.pad_id) + (torch.from_numpy(idx),))
        return out


def fit_pair(pair: PreferencePair, seq_len: int) -> PreferencePair | None:
    """The pair cut to ``seq_len`` tokens per row: the prompt loses its beginning first (a reply
    depends most on what came last), then the completions their end; None when no completion token
    is left."""
    longest = max(len(pair.chosen), len(pair.rejected))
    prompt = pair.prompt
    if len(prompt) + longest > seq_len:
        prompt = prompt[max(0, len(prompt) - max(seq_len - longest, 1)):] if seq_len > longest else prompt[-1:]
    room = seq_len - len(prompt)
    if room < 1 or not pair.chosen or not pair.rejected:
        return None
    fitted = PreferencePair(prompt, pair.chosen[:room], pair.rejected[:room])
    return fitted if fitted.chosen and fitted.rejected else None


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``(B, 2, T)`` pairs -> ``(2B, T)`` rows: the chosen rows, then the rejected ones."""
    return torch.cat([t[:, 0], t[:, 1]])


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, attention_mask, completion_mask)`` of shape ``(B, 2, T)`` (chosen, rejected),
    right-padded with ``pad_id`` to the longest row."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    T = max(len(a) + len(b) for a, b in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.long)
    completion = torch.zeros(len(rows), T, dtype=torch.long)
    for r, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        tokens[r, :n] = torch.tensor([*prompt, *reply])
        attention[r, :n] = 1
        completion[r, len(prompt):n] = 1
    B = len(pairs)
    return tuple(t.view(2, B, T).transpose(0, 1).contiguous() for t in (tokens, attention, completion))

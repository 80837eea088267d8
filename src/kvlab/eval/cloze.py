"""Two tasks built from text (the off-domain sets of :mod:`kvlab.data.offdomain`, or any documents), on
which a model that reads its context scores well, so a shrunk model's score can be set beside its
original's:

- **next line** (log-likelihood multiple choice, as lm-eval scores HellaSwag): a passage's few lines,
  then four candidate next lines — the true one and three lines of about its length from *other*
  documents. The model picks the choice of highest total log-likelihood (``acc``) and of highest
  log-likelihood per byte (``acc_norm``).
- **recall** (exact match, as LAMBADA scores its last word): a passage cut before an identifier (a
  word of at least five letters, digits or underscores) that appeared earlier in it; the model must
  continue with that identifier, whole. Scored by teacher forcing: every token of the identifier is
  the most likely next token, and so is a token after it that does not continue the word — what
  greedy decoding would produce, decided in one forward pass.

Items are drawn by a seeded generator from the documents in their order, one item per document in
turn, so the original and every shrunk model answer the same items. Context and continuation are
tokenized as lm-eval does: the whole text, split where the context's own tokens end (a space before
the continuation belongs to the continuation).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kvlab.data.corpus import Document
from kvlab.errors import ConfigError

CONTEXT_CHARS = 240             # of the passage before a next-line item (about 60 tokens)
RECALL_CONTEXT_CHARS = 600      # of the passage before a recall item
_LINE_CHARS = (20, 100)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{4,}")


@dataclass(frozen=True)
class ClozeItem:
    context: str
    choices: tuple[str, ...]    # next line: the candidates; recall: the one identifier
    answer: int                 # index of the true choice
    source: str                 # the document it was cut from


def next_line_items(docs: Sequence[Document], n: int, seed: int = 0, n_choices: int = 4) -> list[ClozeItem]:
    """Up to ``n`` next-line items (module docstring) from ``docs``."""
    rng = random.Random(seed)
    lines = {d.id: [ln.rstrip() for ln in d.text.splitlines()] for d in docs}
    pool = [(d.id, ln) for d in docs for ln in lines[d.id] if _LINE_CHARS[0] <= len(ln.strip()) <= _LINE_CHARS[1]]
    per_doc = []
    for d in docs:
        ls = lines[d.id]
        spots = [i for i in range(3, len(ls)) if _LINE_CHARS[0] <= len(ls[i].strip()) <= _LINE_CHARS[1]
                 and ls.count(ls[i]) == 1]
        rng.shuffle(spots)
        per_doc.append((d.id, ls, spots))
    items = []
    for round_ in range(max((len(s) for _, _, s in per_doc), default=0)):
        for doc_id, ls, spots in per_doc:
            if len(items) >= n or round_ >= len(spots):
                continue
            i = spots[round_]
            gold = ls[i]
            others = [ln for other, ln in pool if other != doc_id and ln != gold
                      and 0.7 * len(gold) <= len(ln) <= 1.3 * len(gold)]
            if len(set(others)) < n_choices - 1:
                continue
            choices = [gold, *rng.sample(sorted(set(others)), n_choices - 1)]
            rng.shuffle(choices)
            context = "\n".join(ls[:i])[-CONTEXT_CHARS:]
            context = context[context.find("\n") + 1:] if "\n" in context else context
            items.append(ClozeItem(context + "\n", tuple(choices), choices.index(gold), doc_id))
    return items


def recall_items(docs: Sequence[Document], n: int, seed: int = 0) -> list[ClozeItem]:
    """Up to ``n`` recall items (module docstring) from ``docs``: identifiers that occur earlier in
    their passage, at least :data:`RECALL_CONTEXT_CHARS` / 4 characters in."""
    rng = random.Random(seed)
    per_doc = []
    for d in docs:
        spots, seen = [], set()
        for m in _IDENTIFIER.finditer(d.text):
            word = m.group()
            if word in seen and m.start() >= RECALL_CONTEXT_CHARS // 4 and not _word_char(d.text[m.end():m.end() + 1]):
                spots.append(m.start())
            seen.add(word)
        rng.shuffle(spots)
        per_doc.append((d, spots))
    items = []
    for round_ in range(max((len(s) for _, s in per_doc), default=0)):
        for d, spots in per_doc:
            if len(items) < n and round_ < len(spots):
                start = spots[round_]
                word = _IDENTIFIER.match(d.text, start).group()
                context = d.text[max(0, start - RECALL_CONTEXT_CHARS):start]
                items.append(ClozeItem(context, (word,), 0, d.id))
    return items


def _word_char(s: str) -> bool:
    return bool(s) and (s[0].isalnum() or s[0] == "_")


@dataclass
class ClozeScore:
    accuracy: float             # next line: acc (total log-likelihood); recall: exact match
    accuracy_norm: float | None     # next line: acc_norm (per byte); recall: None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def _split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; the whole text's tokens
    cut where the context's own end."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(stripped, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def _rows(tokenizer, pairs: Sequence[tuple[str, str]]):
    """(prefix + context + continuation tokens, index of the continuation's first token, its tokens)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for context, continuation in pairs:
        ctx, cont = _split(tokenizer, context, continuation)
        if not cont:
            raise ConfigError(f"an empty continuation after {context[-40:]!r}")
        out.append(([prefix, *ctx, *cont], 1 + len(ctx), cont))
    return out


def continuation_logprobs(model, rows, batch_size: int, kv_quant, backend, after: int = 0):
    """For each row, the log-probabilities ``(len(continuation) + after, vocab)`` of the next token at the
    positions that predict its continuation (and ``after`` more); the LM head reads only those."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r[0]) for r in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for k, (ids, _, _) in enumerate(chunk):
            tokens[k, :len(ids)] = torch.tensor(ids)
            mask[k, :len(ids)] = 1
        cache = model.new_cache(len(chunk), width, kv_quant=kv_quant) if kv_quant else None
        h = model.hidden_states(tokens.to(model.device), cache=cache, backend=backend,
                                attention_mask=mask.to(model.device) if bool((mask == 0).any()) else None)
        for k, (ids, first, cont) in enumerate(chunk):
            at = h[k, first - 1:min(first - 1 + len(cont) + after, len(ids))]
            yield (ids, first, cont), F.log_softmax(model.lm_head(at).float(), -1).cpu()


@torch.inference_mode()
def next_line_accuracy(model, tokenizer, items: Sequence[ClozeItem], *, batch_size: int = 8, kv_quant=None,
                       backend: str | None = None) -> ClozeScore:
    """``acc`` and ``acc_norm`` of ``model`` on next-line ``items``."""
    if not items:
        raise ConfigError("no next-line items to score (the text has too few lines of 20-100 characters)")
    model.eval()
    rows = _rows(tokenizer, [(it.context, c) for it in items for c in it.choices])
    scores = []
    for (_, _, cont), logp in continuation_logprobs(model, rows, batch_size, kv_quant, backend):
        scores.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
    hit = hit_norm = 0
    k = 0
    for it in items:
        ll = scores[k:k + len(it.choices)]
        k += len(it.choices)
        per_byte = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(ll, it.choices)]
        hit += max(range(len(ll)), key=ll.__getitem__) == it.answer
        hit_norm += max(range(len(ll)), key=per_byte.__getitem__) == it.answer
    return ClozeScore(hit / len(items), hit_norm / len(items), len(items))


@torch.inference_mode()
def recall_accuracy(model, tokenizer, items: Sequence[ClozeItem], *, batch_size: int = 8, kv_quant=None,
                    backend: str | None = None) -> ClozeScore:
    """Exact-match accuracy of ``model`` on recall ``items`` (greedy, by teacher forcing: module docstring)."""
    if not items:
        raise ConfigError("no recall items to score (the text repeats no identifier of five characters or more)")
    model.eval()
    continues_word = _continuing_tokens(tokenizer, model.cfg.vocab_size)
    rows = _rows(tokenizer, [(it.context, it.choices[0]) for it in items])
    hit = 0
    for (_, _, cont), logp in continuation_logprobs(model, rows, batch_size, kv_quant, backend, after=1):
        best = logp.argmax(-1)                      # the word's tokens, then the one after it
        hit += bool((best[:-1] == torch.tensor(cont)).all()) and not continues_word[int(best[-1])]
    return ClozeScore(hit / len(items), None, len(items))


def _continuing_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """Whether each token, following a word, would continue it (it starts with a letter, digit or _)."""
    out = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        out[i] = _word_char(tokenizer.decode([i]))
    return out

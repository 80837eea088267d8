"""Perplexity and bits per byte of a model on a set of documents.

Method. Each document is tokenized on its own and preceded by one context token (the
tokenizer's BOS, else its EOS, as lm-eval-harness does for rolling log-likelihoods), so that every
token of the text is predicted. A document longer than ``seq_len`` is scored in windows of
``seq_len`` tokens that advance by ``stride`` (default ``seq_len // 2``): each window scores only
the tokens the previous one did not, so every token is scored once, with at least
``seq_len - stride`` tokens of context except near the start of its document.

perplexity = exp(total NLL / tokens scored); bits per byte = total NLL / ln 2 / UTF-8 bytes of
the text scored — comparable across tokenizers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kvlab.data.corpus import Document
from kvlab.errors import ConfigError
from kvlab.models.decoder import Transformer
from kvlab.progress import progress as show_progress


@dataclass
class EvalResult:
    perplexity: float
    bits_per_byte: float
    nll: float
    tokens: int
    bytes: int
    documents: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Window:
    tokens: list[int]        # model input
    targets: list[int]       # next tokens; -100 where the token is context only


def windows(ids: Sequence[int], seq_len: int, stride: int) -> Iterator[Window]:
    """Windows over ``ids`` (context token first) that together score ids[1:] exactly once."""
    n = len(ids)
    scored_until = 1                   # ids[:scored_until] are already predicted (or the prefix)
    start = 0
    while scored_until < n:
        end = min(start + seq_len + 1, n)
        chunk = list(ids[start:end])
        targets = chunk[1:]
        first_new = scored_until - start - 1          # index in targets of the first unscored token
        targets = [-100] * first_new + targets[first_new:]
        yield Window(chunk[:-1], targets)
        scored_until = end
        start = min(start + stride, max(n - seq_len - 1, 0)) if end < n else n


@torch.no_grad()
def batch_loss(model, batches: Sequence[torch.Tensor], kv_quant=None) -> float:
    """Mean next-token cross-entropy (nats) over ``batches`` of token rows ``(B, T)``, each row
    predicting its tokens 1..T−1; with ``kv_quant`` every query attends to keys and values read back
    from a cache in that format (what generation sees)."""
    model.eval()
    total, count = 0.0, 0
    for tokens in batches:
        tokens = tokens.to(model.device)
        cache = model.new_cache(tokens.shape[0], tokens.shape[1], kv_quant=kv_quant) if kv_quant else None
        logits = model(tokens[:, :-1], cache=cache).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"))
        count += tokens[:, 1:].numel()
    if not count:
        raise ConfigError("no tokens to score")
    return total / count


def document_ids(tokenizer, doc: Document, prefix_id: int) -> list[int]:
    ids = tokenizer.encode(doc.text, add_special_tokens=False)
    return [prefix_id, *ids]


@dataclass
class ScoredText:
    """``docs`` cut into padded batches of windows, as :func:`evaluate` scores them."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]    # tokens, targets, mask (None: full)
    n_bytes: int
    documents: int
    seq_len: int
    stride: int


def scored_text(model: Transformer, tokenizer, docs: Sequence[Document], *, seq_len: int = 1024,
                stride: int | None = None, max_tokens: int | None = None, batch_size: int = 4) -> ScoredText:
    """The windows of ``docs`` that score each token once (module docstring), in batches, checked
    against ``model``'s context: what :func:`evaluate` and :func:`kvlab.eval.fidelity.fidelity` read."""
    if tokenizer is None:
        raise ConfigError("evaluation needs a tokenizer; this model has none")
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} must be at least 2")
    stride = max(seq_len // 2, 1) if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride={stride} must be in [1, seq_len={seq_len}] (the window advance; default "
                          f"seq_len / 2)")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens} must be at least 1 (leave it out to score every token)")
    if model.cfg.pos == "learned" and seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    if model.cfg.extrapolates(seq_len):
        warnings.warn(f"seq_len={seq_len} goes past the context this model was trained for (max_seq_len="
                      f"{model.cfg.max_seq_len}); its perplexity there measures extrapolation", stacklevel=3)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start documents with")
    if not docs:
        raise ConfigError("no documents to evaluate")

    # Tokenize; stop at max_tokens, cutting the last document if needed.
    work: list[list[int]] = []
    n_bytes = n_tokens = 0
    for doc in docs:
        ids = document_ids(tokenizer, doc, prefix)
        if max_tokens is not None and n_tokens + len(ids) - 1 > max_tokens:
            ids = ids[:max_tokens - n_tokens + 1]
            if len(ids) < 2:
                break
            n_bytes += len(tokenizer.decode(ids[1:]).encode("utf-8"))
        else:
            n_bytes += len(doc.text.encode("utf-8"))
        work.append(ids)
        n_tokens += len(ids) - 1
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    if n_tokens == 0:
        raise ConfigError(f"the {len(docs)} document(s) hold no text to score")
    all_windows = [w for ids in work for w in windows(ids, seq_len, stride)]
    batches = []
    for i in range(0, len(all_windows), batch_size):
        batch = all_windows[i:i + batch_size]
        width = max(len(w.tokens) for w in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for k, w in enumerate(batch):               # right padding; padded targets are ignored
            tokens[k, :len(w.tokens)] = torch.tensor(w.tokens)
            targets[k, :len(w.targets)] = torch.tensor(w.targets)
            mask[k, :len(w.tokens)] = 1
        batches.append((tokens, targets, mask if bool((mask == 0).any()) else None))
    return ScoredText(batches, n_bytes, len(work), seq_len, stride)


def window_logits(model: Transformer, tokens: torch.Tensor, mask: torch.Tensor | None, *, backend: str | None = None,
                  kv_quant=None) -> torch.Tensor:
    """``model``'s float32 logits for a batch of :func:`scored_text` (through a ``kv_quant`` cache if given)."""
    device = model.device
    cache = model.new_cache(tokens.shape[0], tokens.shape[1], kv_quant=kv_quant) if kv_quant else None
    return model(tokens.to(device), attention_mask=mask.to(device) if mask is not None else None, backend=backend,
                 cache=cache).float()


@torch.inference_mode()
def evaluate(model: Transformer, tokenizer, docs: Sequence[Document], *, seq_len: int = 1024,
             stride: int | None = None, max_tokens: int | None = None, batch_size: int = 4,
             progress: bool = True, backend: str | None = None, kv_quant: str | None = None) -> EvalResult:
    """Perplexity and bits per byte of ``model`` on ``docs`` (see the module docstring).

    With ``kv_quant`` (``'fp8'``, ``'int8'``, ``'int4'`` or ``'int8/int4'``) each window runs through a
    quantized KV cache, so every query attends to quantized keys and values — what generation with that cache sees."""
    text = scored_text(model, tokenizer, docs, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                       batch_size=batch_size)
    total_nll, scored = 0.0, 0
    for tokens, targets, mask in show_progress(text.batches, "scoring", progress):
        logits = window_logits(model, tokens, mask, backend=backend, kv_quant=kv_quant)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.to(logits.device).flatten(), reduction="sum")
        total_nll += float(nll)
        scored += int((targets != -100).sum())
    return EvalResult(perplexity=math.exp(total_nll / scored), bits_per_byte=total_nll / math.log(2) / text.n_bytes,
                      nll=total_nll, tokens=scored, bytes=text.n_bytes, documents=text.documents, seq_len=seq_len,
                      stride=text.stride)

"""Generation: one prefill over the (left-padded) prompts, then one-token decode steps.

The KV cache compacts the padding away, so each row decodes at its own positions; a row that
emits a stop token is finished (later tokens for it are computed but discarded) and the loop
ends when every row is finished or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvlab.errors import ConfigError
from kvlab.models.decoder import Transformer


@dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy; ``top_k``/``top_p`` restrict sampling to the top tokens."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ConfigError(f"temperature={self.temperature!r} must be >= 0 (0 means greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k={self.top_k!r} must be a positive integer or None")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set every logit outside the top-k and outside the smallest top-p nucleus to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from ``logits (B, vocab)``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_token_lists(rows, vocab_size: int, max_new_tokens: int, what: str) -> list[list[int]]:
    """Prompts (or an encoder–decoder's sources) as lists of ints, after one-line checks: a non-empty
    list of non-empty token-id lists inside the vocabulary, and a non-negative ``max_new_tokens``."""
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist()
    if not rows or isinstance(rows[0], int):
        raise ConfigError(f"{what}s must be a non-empty list of token-id lists, e.g. [[1, 2, 3]]")
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise ConfigError(f"{what} {i} is empty; every {what} needs at least one token")
        bad = [t for t in row if not 0 <= int(t) < vocab_size]
        if bad:
            raise ConfigError(f"{what} {i} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    return [list(map(int, row)) for row in rows]


def sampling_loop(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], max_new_tokens: int,
                  params: SamplingParams, generator: torch.Generator | None, stop: torch.Tensor,
                  on_token: Callable[[int, int], None] | None) -> list[list[int]]:
    """Choose a token per row from ``logits (B, vocab)``, then ``step(tokens)`` for the next logits,
    until every row has emitted a ``stop`` token or ``max_new_tokens`` are chosen; a finished row's
    later tokens are computed but not kept. Returns each row's tokens (its stop token last)."""
    outputs: list[list[int]] = [[] for _ in range(logits.shape[0])]
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, params, generator)
        done = finished.tolist()
        for row, tok in enumerate(nxt.tolist()):
            if not done[row]:
                outputs[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
        finished |= torch.isin(nxt, stop)
        if bool(finished.all()) or i == max_new_tokens - 1:
            break
        logits = step(nxt)
    return outputs


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens, attention_mask)``; the mask is None when all prompts have the same length."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    uniform = all(len(p) == width for p in prompts)
    return tokens.to(device), (None if uniform else mask.to(device))


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_tokens: Sequence[int] | None = None,
             on_token: Callable[[int, int], None] | None = None, backend: str | None = None,
             cache_dtype: str | torch.dtype | None = None, kv_quant: str | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Returns the new tokens of each prompt, ending with the stop token if one was produced.
    ``seed`` makes sampling deterministic. ``on_token(row, token_id)`` is called for every
    token as soon as it is chosen (streaming). ``stop_tokens`` defaults to the model's EOS.
    ``kv_quant`` (``'fp8'``, ``'int8'``, ``'int4'``, or keys/values ``'int8/int4'``) keeps the KV cache
    quantized (:mod:`kvlab.cache.quantized`).
    """
    cfg = model.cfg
    params = SamplingParams(temperature, top_k, top_p)
    prompts = check_token_lists(prompts, cfg.vocab_size, max_new_tokens, "prompt")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if cfg.extrapolates(longest):
        if cfg.pos == "learned":
            raise ConfigError(f"a prompt of {max(len(p) for p in prompts)} tokens plus max_new_tokens={max_new_tokens} "
                              f"is longer than this model's positions (max_seq_len={cfg.max_seq_len}); shorten the "
                              f"prompt or generate fewer tokens")
        warnings.warn(f"a prompt of {max(len(p) for p in prompts)} tokens plus {max_new_tokens} new ones goes past the "
                      f"context this model was trained for (max_seq_len={cfg.max_seq_len}); expect worse text "
                      f"beyond it", stacklevel=2)
    if stop_tokens is None:
        stop_tokens = [] if cfg.eos_token_id is None else [cfg.eos_token_id]
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=model.device)

    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    tokens, mask = left_pad(prompts, pad_id, model.device)
    B = len(prompts)
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    cache = model.new_cache(B, model.n_virtual_tokens + tokens.shape[1] + max_new_tokens, dtype=cache_dtype,
                            kv_quant=kv_quant)
    logits = model(tokens, attention_mask=mask, cache=cache, backend=backend, logits_to_keep=1)[:, -1]
    return sampling_loop(logits, lambda nxt: model(nxt.unsqueeze(1), cache=cache, backend=backend)[:, -1],
                         max_new_tokens, params, generator, stop, on_token)

"""Generation with an encoder–decoder: the source is encoded once, its cross-attention K/V go into
the cache (:class:`~kvlab.cache.cross.Seq2SeqCache`), and the decoder continues from
``decoder_start_token_id`` one token at a time — greedily, by sampling, or by beam search.

Beam search keeps ``num_beams`` hypotheses per source. Each step scores every continuation of every
live hypothesis by its summed log-probability, takes the best ``2 × num_beams`` of each source, closes
those that end in a stop token (when they rank among the first ``num_beams``) with the score
``sum log p / n ** length_penalty`` (``n`` generated tokens, the stop token included), and carries the
best ``num_beams`` others on; the cache rows follow their hypotheses (``Seq2SeqCache.select_rows``).
A source is done when it holds ``num_beams`` closed hypotheses and no open one can still beat the
worst of them (``early_stopping=False``: its best sum over the longest length it could reach, an upper
bound since every log-probability is ≤ 0; ``True``: at once). At ``max_new_tokens`` the open hypotheses
are closed as they are. The best closed hypothesis is returned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from kvlab.errors import ConfigError
from kvlab.inference.generation import SamplingParams, check_token_lists, sampling_loop
from kvlab.models.encoder_decoder import EncoderDecoder


def right_pad(sources: Sequence[Sequence[int]], pad_id: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens, mask)`` of right-padded sources (T5's convention); the mask is None when all have
    the same length."""
    width = max(len(s) for s in sources)
    tokens = torch.full((len(sources), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sources), width), dtype=torch.long)
    for i, s in enumerate(sources):
        tokens[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    uniform = all(len(s) == width for s in sources)
    return tokens.to(device), (None if uniform else mask.to(device))


def _check(model: EncoderDecoder, sources, max_new_tokens: int, num_beams: int) -> list[list[int]]:
    cfg = model.cfg
    if not cfg.is_encoder_decoder:
        raise ConfigError("generate_seq2seq needs an encoder–decoder; a decoder-only model uses kvlab.generate")
    sources = check_token_lists(sources, cfg.vocab_size, max_new_tokens, "source")
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ConfigError(f"num_beams={num_beams!r} must be a positive integer (1: no beam search)")
    if cfg.decoder_start_token_id is None:
        raise ConfigError("the model has no decoder_start_token_id (the token every target begins with); set it in "
                          "its config")
    longest = max(max(len(s) for s in sources), max_new_tokens + 1)
    if cfg.extrapolates(longest):
        warnings.warn(f"a sequence of {longest} tokens goes past the context this model was trained for "
                      f"(max_seq_len={cfg.max_seq_len}); expect worse text beyond it", stacklevel=3)
    return sources


@torch.inference_mode()
def generate_seq2seq(model: EncoderDecoder, sources: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
                     temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                     seed: int | None = None, num_beams: int = 1, length_penalty: float = 1.0,
                     early_stopping: bool = False, stop_tokens: Sequence[int] | None = None,
                     on_token: Callable[[int, int], None] | None = None, backend: str | None = None,
                     cache_dtype: str | torch.dtype | None = None) -> list[list[int]]:
    """The target tokens generated for each source (a list of token ids), ending with the stop token
    if one was produced. ``temperature=0`` is greedy; ``num_beams > 1`` is beam search (greedy over
    hypotheses: no sampling). ``stop_tokens`` defaults to the model's EOS. ``on_token(row, id)``
    streams tokens as they are chosen (not with beam search, whose hypotheses change until the end)."""
    sources = _check(model, sources, max_new_tokens, num_beams)
    params = SamplingParams(temperature, top_k, top_p)
    if num_beams > 1 and not params.greedy:
        raise ConfigError("beam search is deterministic; use temperature=0 with num_beams > 1 (or num_beams=1 "
                          "to sample)")
    if num_beams > 1 and on_token is not None:
        raise ConfigError("on_token streams tokens as they are chosen, which beam search cannot (its best "
                          "hypothesis is known only at the end)")
    cfg = model.cfg
    if stop_tokens is None:
        stop_tokens = [] if cfg.eos_token_id is None else [cfg.eos_token_id]
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=model.device)
    B = len(sources)
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    src, src_mask = right_pad(sources, pad, model.device)
    memory = model.encode(src, src_mask, backend)
    if num_beams > 1:
        return _beam_search(model, memory, B, max_new_tokens, num_beams, length_penalty, early_stopping, stop,
                            backend, cache_dtype)
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(B, max_new_tokens + 1, dtype=cache_dtype)
    start = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=model.device)
    logits = model(None, start, memory=memory, cache=cache, backend=backend)[:, -1]
    return sampling_loop(logits, lambda nxt: model(None, nxt.unsqueeze(1), cache=cache, backend=backend)[:, -1],
                         max_new_tokens, params, generator, stop, on_token)


class _Hypotheses:
    """The closed hypotheses of one source: the best ``num_beams`` by their normalized score."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.closed: list[tuple[float, list[int]]] = []

    def score(self, sum_logprobs: float, length: int) -> float:
        return sum_logprobs / length ** self.length_penalty

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        self.closed.append((self.score(sum_logprobs, len(tokens)), tokens))
        self.closed.sort(key=lambda c: -c[0])
        del self.closed[self.num_beams:]

    def done(self, best_open_sum: float, max_length: int, early_stopping: bool) -> bool:
        if len(self.closed) < self.num_beams:
            return False
        if early_stopping:
            return True
        # The best any open hypothesis can still reach: its sum cannot grow, and a negative sum is
        # divided by the largest length (lp > 0) or the smallest (lp <= 0) it may get.
        length = max_length if self.length_penalty > 0 else 1
        return self.score(best_open_sum, length) <= self.closed[-1][0]


def _beam_search(model: EncoderDecoder, memory, B: int, max_new_tokens: int, K: int, length_penalty: float,
                 early_stopping: bool, stop: torch.Tensor, backend: str | None, cache_dtype) -> list[list[int]]:
    dev = model.device
    cache = model.new_cache(B * K, max_new_tokens + 1, dtype=cache_dtype)
    cache.cross = model.cross_kv(memory).select_rows(torch.arange(B, device=dev).repeat_interleave(K))
    tokens = torch.full((B * K, 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=dev)
    # Only the first beam of each source is live at the start (the others are copies of it).
    sums = torch.full((B, K), float("-inf"), device=dev)
    sums[:, 0] = 0.0
    paths: list[list[int]] = [[] for _ in range(B * K)]
    hyps = [_Hypotheses(K, length_penalty) for _ in range(B)]
    done = [False] * B
    stop_set = set(stop.tolist())
    for step in range(max_new_tokens):
        logits = model(None, tokens, cache=cache, backend=backend)[:, -1].float()
        V = logits.shape[-1]
        logprobs = torch.log_softmax(logits, -1).view(B, K, V) + sums.unsqueeze(-1)
        top, index = logprobs.view(B, K * V).topk(min(2 * K, K * V), dim=-1)
        beam_of, token_of = (index // V).tolist(), (index % V).tolist()
        top = top.tolist()
        new_rows, new_tokens, new_sums, new_paths = [], [], [], []
        for b in range(B):
            carried = []
            for rank, (score, beam, tok) in enumerate(zip(top[b], beam_of[b], token_of[b])):
                if len(carried) == K:
                    break
                if score == float("-inf"):
                    continue
                path = paths[b * K + beam] + [tok]
                if tok in stop_set:
                    if rank < K and not done[b]:
                        hyps[b].add(path, score)
                    continue
                carried.append((b * K + beam, tok, score, path))
            while len(carried) < K:           # a finished source keeps dead rows until the batch ends
                carried.append((b * K, 0, float("-inf"), []))
            for row, tok, score, path in carried:
                new_rows.append(row)
                new_tokens.append(tok)
                new_sums.append(score)
                new_paths.append(path)
        sums = torch.tensor(new_sums, device=dev).view(B, K)
        paths = new_paths
        for b in range(B):
            if not done[b]:
                done[b] = hyps[b].done(float(sums[b].max()), max_new_tokens, early_stopping)
        if all(done) or step == max_new_tokens - 1:
            break
        cache.select_rows(torch.tensor(new_rows, device=dev))
        tokens = torch.tensor(new_tokens, device=dev).unsqueeze(1)
    for b in range(B):
        if not done[b]:                       # out of tokens: the open hypotheses close as they are
            for k in range(K):
                s = float(sums[b, k])
                if s > float("-inf"):
                    hyps[b].add(paths[b * K + k], s)
    return [h.closed[0][1] if h.closed else [] for h in hyps]

"""How fast a candidate decodes against the original, measured the way a ratio can be trusted: both
models in one process, steps interleaved round by round, each round's ratio taken, and the median
and range of those ratios reported. On a CPU the steps run on one thread and are timed in process
CPU time (wall time on a shared machine swings by tens of percent: a model against itself read 2x
with wall time and one repeat); on a GPU in wall time between synchronisations.

Speed does not depend on what the weights or the cache hold, so both models may be random ones of
the right shapes (the cache is filled to the context directly, no prefill is run).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from kvlab.dtypes import KVQuant


@dataclass
class SpeedRatio:
    """Decode step of a candidate against the original's, at ``batch`` rows of ``context`` tokens."""

    batch: int
    context: int
    original_ms: float           # medians over the rounds
    candidate_ms: float
    ratio: float                 # median of the per-round candidate / original ratios
    ratio_min: float
    ratio_max: float
    rounds: int
    clock: str                   # "process CPU, 1 thread" or "wall (cuda)"

    def to_dict(self) -> dict:
        return asdict(self)


class _Stepper:
    """One model with a cache filled to ``context`` tokens per row, stepping one token per row."""

    def __init__(self, model, kv_quant: KVQuant | None, batch: int, context: int, seed: int):
        self.model = model
        self.cache = model.new_cache(batch, context + 1, kv_quant=kv_quant)
        g = torch.Generator().manual_seed(seed)
        for layer in self.cache.layers.values():        # speed does not depend on the values; no NaN
            for name in getattr(layer, "token_fields", ()):
                t = getattr(layer, name)
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
        self.context = context
        self.token = torch.randint(0, model.cfg.vocab_size, (batch, 1), generator=g).to(model.device)

    @torch.inference_mode()
    def step(self) -> None:
        self.cache.assume_filled(self.context)
        self.model(self.token, cache=self.cache)


def _timed(stepper: _Stepper, steps: int, cuda: bool) -> float:
    """Seconds per step over ``steps`` steps (process CPU time, or wall time on a GPU)."""
    if cuda:
        torch.cuda.synchronize()
        t = time.perf_counter()
    else:
        t = time.process_time()
    for _ in range(steps):
        stepper.step()
    if cuda:
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps
    return (time.process_time() - t) / steps


def decode_ratio(original, candidate, kv_quant: KVQuant | None, *, batch: int, context: int, rounds: int = 5,
                 steps: int = 2, seed: int = 0) -> SpeedRatio:
    """``candidate`` (its cache stored in ``kv_quant``) against ``original``, interleaved: each round
    times ``steps`` steps of each, the order alternating between rounds."""
    cuda = original.device.type == "cuda"
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        a = _Stepper(original, None, batch, context, seed)
        b = _Stepper(candidate, kv_quant, batch, context, seed)
        a.step()
        b.step()                                        # warm-up: allocations, kernel choice
        times_a, times_b = [], []
        for r in range(rounds):
            pair = (a, b) if r % 2 == 0 else (b, a)
            measured = {id(s): _timed(s, steps, cuda) for s in pair}
            times_a.append(measured[id(a)])
            times_b.append(measured[id(b)])
    finally:
        torch.set_num_threads(threads)
    ratios = [tb / ta for ta, tb in zip(times_a, times_b)]
    return SpeedRatio(batch=batch, context=context, original_ms=1e3 * statistics.median(times_a),
                      candidate_ms=1e3 * statistics.median(times_b), ratio=statistics.median(ratios),
                      ratio_min=min(ratios), ratio_max=max(ratios), rounds=rounds,
                      clock="wall (cuda)" if cuda else "process CPU, 1 thread")


@dataclass
class ServingGain:
    """Throughput of the engine ``kvlab serve`` runs, original against candidate, at one KV budget
    (``budget_bytes``, what holds ``original_seqs`` of the original's sequences) under ``clients``
    concurrent requests of ``prompt_tokens`` + ``max_tokens`` (EOS ignored)."""

    budget_bytes: int
    clients: int
    prompt_tokens: int
    max_tokens: int
    original_tok_s: float        # means over the rounds (wall time, every thread: as a server runs)
    candidate_tok_s: float
    gain: float
    original_running: int        # the most sequences running at once
    candidate_running: int
    rounds: int

    def to_dict(self) -> dict:
        return asdict(self)


def _served(model, kv_quant: KVQuant | None, budget: int, clients: int, prompts, max_tokens: int) -> tuple[float, int]:
    from kvlab.inference.engine import Engine, Request

    engine = Engine(model, kv_budget_bytes=budget, max_len=len(prompts[0]) + max_tokens, max_seqs=clients,
                    max_queue=clients, kv_quant=kv_quant)
    for p in prompts:
        engine.submit(Request(prompt=list(p), max_tokens=max_tokens, stop_tokens=frozenset()))
    t = time.perf_counter()
    engine.run_until_done()
    return clients * max_tokens / (time.perf_counter() - t), engine.stats.max_running


def serving_gain(original, candidate, kv_quant: KVQuant | None, *, clients: int, prompt_tokens: int, max_tokens: int,
                 original_seqs: int, rounds: int = 2, seed: int = 0) -> ServingGain:
    """Both models served by :class:`kvlab.inference.engine.Engine` with the same KV budget, in
    alternating rounds, each cache in the model's dtype (the candidate's in ``kv_quant``)."""
    from kvlab.config.accounting import cache_bytes

    block = 16                                   # the pool's block: whole blocks per sequence
    length = -(-(prompt_tokens + max_tokens) // block) * block
    budget = original_seqs * length * cache_bytes(original.cfg, original.dtype).per_token
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, original.cfg.vocab_size, (clients, prompt_tokens), generator=g).tolist()
    runs: dict[str, list[tuple[float, int]]] = {"a": [], "b": []}
    for r in range(rounds):
        for key in ("a", "b") if r % 2 == 0 else ("b", "a"):
            model, kvq = (original, None) if key == "a" else (candidate, kv_quant)
            runs[key].append(_served(model, kvq, budget, clients, prompts, max_tokens))
    a = statistics.mean(s for s, _ in runs["a"])
    b = statistics.mean(s for s, _ in runs["b"])
    return ServingGain(budget_bytes=budget, clients=clients, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                       original_tok_s=a, candidate_tok_s=b, gain=b / a, original_running=max(n for _, n in runs["a"]),
                       candidate_running=max(n for _, n in runs["b"]), rounds=rounds)

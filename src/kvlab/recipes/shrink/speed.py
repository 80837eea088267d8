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

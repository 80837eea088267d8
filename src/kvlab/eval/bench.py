"""Decode throughput of a model at a long-context batch.

The KV cache is filled directly with random values up to ``context`` tokens per row (speed does
not depend on what the cache holds), then single-token decode steps are timed; each step is
rewound to the same length, so every timed step reads exactly ``context + 1`` tokens per row.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from kvlab.errors import ConfigError
from kvlab.models.decoder import Transformer


@dataclass
class DecodeSpeed:
    batch_size: int
    context: int
    step_ms: float                 # median over the timed steps
    tokens_per_s: float            # batch_size / step time
    kv_bytes_per_step: int         # KV cache bytes one step reads (cache dtype)
    kv_read_GBps: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure_decode(model: Transformer, batch_size: int, context: int, *, steps: int = 10, warmup: int = 2,
                   backend: str | None = None, seed: int = 0) -> DecodeSpeed:
    """Median decode-step time with ``context`` tokens already cached in every row."""
    if steps < 1 or warmup < 0:
        raise ConfigError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    if context < 1:
        raise ConfigError(f"context={context} must be a positive number of tokens")
    cache = model.new_cache(batch_size, context + 1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for t in (*cache.keys.values(), *cache.values.values()):
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype))
    token = torch.randint(0, model.cfg.vocab_size, (batch_size, 1), generator=g).to(model.device)
    times = []
    for i in range(warmup + steps):
        cache.assume_filled(context)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(token, cache=cache, backend=backend)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    kv_bytes = cache.nbytes            # what one step can read: windows and states count as held
    return DecodeSpeed(batch_size=batch_size, context=context, step_ms=1e3 * step, tokens_per_s=batch_size / step,
                       kv_bytes_per_step=kv_bytes, kv_read_GBps=kv_bytes / step / 1e9)

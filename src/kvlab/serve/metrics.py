"""The server's Prometheus metrics (``GET /metrics``).

Counters and histograms are kept here as requests run: finished requests by finish reason, prompt
and generated tokens, time to first token, time per output token. The engine's state (queue
length, running sequences, KV blocks in use, preemptions, tokens/s) is read at each scrape.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from kvlab.inference.engine import Engine

__all__ = ["ServingMetrics"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics:
    """Prometheus metrics of one app: counters and histograms kept here, engine state read at each scrape."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.engine = engine
        self.requests = Counter("kvlab_requests", "finished requests", ["finish_reason"], registry=self.registry)
        self.prompt_tokens = Counter("kvlab_prompt_tokens", "prompt tokens of admitted requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("kvlab_generation_tokens", "tokens generated", registry=self.registry)
        self.ttft = Histogram("kvlab_time_to_first_token_seconds", "arrival to first token", buckets=_BUCKETS,
                              registry=self.registry)
        self.tpot = Histogram("kvlab_time_per_output_token_seconds", "time between a request's tokens",
                              buckets=_BUCKETS, registry=self.registry)
        self._recent: deque[tuple[float, int]] = deque()
        self.registry.register(self)

    # -------------------------------------------------------------- what the serving layer counts
    def first_token(self, since_arrival: float, prompt_tokens: int) -> None:
        """A choice's first token, ``since_arrival`` seconds after its request arrived."""
        self.ttft.observe(since_arrival)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc()

    def next_token(self, since_previous: float) -> None:
        """A choice's later token, ``since_previous`` seconds after its previous one."""
        self.tpot.observe(since_previous)
        self.generation_tokens.inc()

    def finished(self, reason: str) -> None:
        """A choice that finished with ``reason`` (stop, length, cancelled)."""
        self.requests.labels(reason).inc()

    def exposition(self) -> str:
        """The Prometheus text of every metric, as a scrape gets it."""
        return generate_latest(self.registry).decode()

    # ------------------------------------------------------------ read from the engine at a scrape
    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens generated per second over about the last ``window`` seconds of scrapes."""
        now, total = time.perf_counter(), self.engine.stats.generated_tokens
        self._recent.append((now, total))
        while len(self._recent) > 1 and now - self._recent[0][0] > window:
            self._recent.popleft()
        t0, n0 = self._recent[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0

    def collect(self):
        """The engine's gauges (prometheus_client's custom-collector protocol)."""
        e = self.engine
        for name, doc, value in (
                ("kvlab_queue_length", "requests waiting for admission", e.queue_length),
                ("kvlab_running_sequences", "sequences holding KV blocks (prefilling or decoding)",
                 len(e.running) + len(e.prefilling)),
                ("kvlab_peak_running_sequences", "the most sequences held at once since the start",
                 e.stats.max_running),
                ("kvlab_kv_blocks_in_use", "KV blocks held by sequences", e.pool.used_blocks),
                ("kvlab_kv_blocks_total", "KV blocks in the pool", e.pool.num_blocks),
                ("kvlab_kv_block_bytes", "bytes of one KV block", e.pool.block_bytes),
                ("kvlab_preemptions", "sequences preempted for KV blocks (recomputed later)", e.stats.preemptions),
                ("kvlab_generation_tokens_per_second", "tokens generated per second, last 10 s",
                 self.tokens_per_second())):
            yield GaugeMetricFamily(name, doc, value=value)

    def describe(self):
        """No names declared in advance: the gauges are built at each scrape."""
        return []

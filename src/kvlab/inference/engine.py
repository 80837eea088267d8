"""Continuous batching: requests join and leave the running batch at every step, over a paged KV pool.

:func:`kvlab.inference.generation.generate` runs a batch it is handed from start to end. A server
cannot wait for a batch to fill or for its longest row to finish, so the :class:`Engine` keeps a
queue of requests and, at every :meth:`Engine.step`:

1. drops cancelled requests and returns their blocks;
2. admits waiting requests, first come first served, while the pool has a free sequence slot and
   blocks for the request (the KV budget is the admission control: a model with a k× smaller cache
   holds about k× the sequences). ``admission="reserve"`` (the default) takes blocks for the prompt
   and all ``max_tokens`` at once, so an admitted request never waits for memory and the admitted
   concurrency is the planner's ``budget // bytes(prompt + max_tokens)``; ``"optimistic"`` takes
   blocks for the prompt only and more as the sequence grows (vLLM's policy: more requests at once
   when many stop early, preemptions when they do not);
3. prefills at most ``prefill_chunk`` prompt tokens, in one batched call over the admitted requests
   in arrival order (chunked prefill: a long prompt is cut into chunks and never stalls the running
   sequences for more than one chunk); when a prompt is done its first token is sampled — the time
   to first token;
4. decodes one token for every running sequence in one batched call; a sequence that crosses a
   block boundary takes a new block, and when none is free (only under ``"optimistic"``) the most
   recently admitted sequence is preempted — its blocks are freed and it goes back to the front of
   the queue, to be prefilled again from its prompt and the tokens it already produced (vLLM's
   recompute preemption), so its output is unchanged.

Each request has its own sampling parameters and generator (``seed``), stop tokens and
``max_tokens``; ``sink`` receives its events: ``("token", id)`` for each new token and then one
``("finish", reason)`` with reason ``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"`` (a
failed forward call: the admitted requests end, the engine goes on).

The engine is not thread-safe by itself except for :meth:`submit` and :meth:`cancel`, which may be
called from any thread while another runs :meth:`run_forever` (the server does so).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvlab.cache.paged import PagedKVPool, PagedSequence
from kvlab.dtypes import KVQuant, parse_kv_quant
from kvlab.errors import ConfigError, KvlabError
from kvlab.inference.generation import SamplingParams, left_pad, sample_next
from kvlab.models.decoder import Transformer

__all__ = ["Engine", "EngineStats", "QueueFull", "Request"]

Event = tuple[str, object]
_ids = itertools.count()
logger = logging.getLogger(__name__)


class QueueFull(KvlabError):
    """The engine's waiting queue holds ``max_queue`` requests already (HTTP 429)."""


@dataclass(eq=False)
class Request:
    """One generation request: a prompt of token ids and how to continue it."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_tokens: frozenset[int] | None = None           # None: the model's EOS
    sink: Callable[[Event], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    # Filled in by the engine.
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None                               # why, when finish_reason is "error"
    arrived: float = field(default_factory=time.perf_counter)
    _seq: PagedSequence | None = None
    _todo: list[int] = field(default_factory=list)       # tokens still to prefill
    _generator: torch.Generator | None = None

    def emit(self, event: Event) -> None:
        if self.sink is not None:
            self.sink(event)


@dataclass
class EngineStats:
    """Counters since the engine started (the server's /metrics reads them; latencies it measures
    itself, per request, so nothing here grows with the number of requests)."""

    requests_finished: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0
    preemptions: int = 0
    max_running: int = 0


class Engine:
    """Continuous batching of ``model`` over a paged pool of ``kv_budget_bytes`` bytes.

    ``max_len`` is the longest sequence (prompt + new tokens) served, by default the model's
    ``max_seq_len``; ``max_seqs`` the most sequences running at once; ``max_queue`` the most waiting;
    ``kv_quant`` (``'fp8'``, ``'int8'``, ``'int4'``, or keys/values ``'int8/int4'``) stores the pool's
    per-token entries quantized.
    """

    def __init__(self, model: Transformer, *, kv_budget_bytes: int, max_len: int | None = None,
                 max_seqs: int = 64, max_queue: int = 256, block_size: int = 16, prefill_chunk: int = 512,
                 admission: str = "reserve",
                 backend: str | None = None, cache_dtype: str | torch.dtype | None = None,
                 kv_quant: str | KVQuant | None = None):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigError(f"max_queue={max_queue!r} must be a non-negative integer")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk={prefill_chunk!r} must be a positive integer")
        if admission not in ("reserve", "optimistic"):
            raise ConfigError(f"admission={admission!r}: use 'reserve' (blocks for max_tokens up front) or "
                              f"'optimistic' (blocks as sequences grow, with preemption)")
        self.admission = admission
        self.model = model.eval()
        self.max_len = max_len or model.cfg.max_seq_len
        self.pool = PagedKVPool(model.cfg, budget_bytes=kv_budget_bytes, max_len=self.max_len, max_seqs=max_seqs,
                                block_size=block_size, dtype=cache_dtype or model.dtype, device=model.device,
                                kv_quant=parse_kv_quant(kv_quant))
        self.max_queue, self.prefill_chunk, self.backend = max_queue, prefill_chunk, backend
        eos = model.cfg.eos_token_id
        self.default_stop = frozenset() if eos is None else frozenset([eos])
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[Request] = deque()
        self._cancels: list[tuple[Request, str]] = []
        self._stopped = False

    # ----------------------------------------------------------------------------- client side
    def check(self, prompt: Sequence[int], max_tokens: int) -> None:
        """Raise :class:`ConfigError` (one line, for a 400) if this request can never be served."""
        V = self.model.cfg.vocab_size
        if not prompt:
            raise ConfigError("the prompt is empty; give at least one token")
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < V)]
        if bad:
            raise ConfigError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {V})")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens!r} must be a positive integer")
        need = len(prompt) + max_tokens + self.model.n_virtual_tokens
        if need > self.max_len:
            raise ConfigError(f"this server's maximum context length is {self.max_len} tokens, but the prompt has "
                              f"{len(prompt)} and max_tokens is {max_tokens} ({need} in all); shorten the prompt "
                              f"or lower max_tokens")
        if not self.pool.can_hold(need):
            raise ConfigError(f"a sequence of {need} tokens needs {self.pool.blocks_for(need)} KV blocks but the "
                              f"whole budget holds {self.pool.num_blocks}; shorten the request or raise the KV budget")

    def submit(self, request: Request) -> Request:
        """Queue a request (any thread); :class:`QueueFull` when ``max_queue`` are waiting already."""
        self.check(request.prompt, request.max_tokens)
        if request.seed is not None:
            request._generator = torch.Generator(device=self.model.device).manual_seed(request.seed)
        with self._lock:
            if self._stopped:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(self._incoming) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already; retry later")
            request._todo = list(request.prompt)
            self._incoming.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        """Finish ``request`` at the next step (any thread): a client went away, or a stop string matched."""
        with self._lock:
            self._cancels.append((request, reason))
            self._wake.notify()

    @property
    def queue_length(self) -> int:
        return len(self.waiting) + len(self._incoming)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self._incoming or self._cancels)

    # ----------------------------------------------------------------------------- engine side
    def run_forever(self, idle_wait: float = 0.05) -> None:
        """Step while there is work, sleep until there is; returns after :meth:`stop`."""
        while True:
            with self._lock:
                while not self._stopped and not self.has_work:
                    self._wake.wait(idle_wait)
                if self._stopped:
                    break
            try:
                self.step()
            except Exception as e:       # a failed call must not leave clients waiting forever
                self.fail_all(e)
        for r in [*self.waiting, *self._incoming, *self.prefilling, *self.running]:
            self._finish(r, "cancelled")

    def fail_all(self, error: Exception) -> None:
        """Finish every admitted request with ``"error"`` (their KV blocks return to the pool); the
        waiting ones stay queued. Logged with its traceback; the engine goes on serving."""
        logger.exception("kvlab engine step failed; %d admitted request(s) end with an error",
                         len(self.prefilling) + len(self.running), exc_info=error)
        for r in [*self.prefilling, *self.running]:
            r.error = f"{type(error).__name__}: {error}"
            self._finish(r, "error")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()

    def run_until_done(self) -> None:
        """Step until every submitted request has finished (tests, offline batches)."""
        while self.has_work:
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            cancels, self._cancels = self._cancels, []
        for request, reason in cancels:
            if request.finish_reason is None:
                self._finish(request, reason)
        self._admit()
        if self.prefilling:
            self._prefill()
        if self.running:
            self._decode()
        self.stats.max_running = max(self.stats.max_running, len(self.running) + len(self.prefilling))

    def _admit(self) -> None:
        while self.waiting:
            r = self.waiting[0]
            seq = self.pool.new_sequence()
            if seq is None:
                return
            need = len(r._todo) + self.model.n_virtual_tokens
            if self.admission == "reserve":    # the whole answer too (its last token is never fed back)
                need = len(r.prompt) + r.max_tokens - 1 + self.model.n_virtual_tokens
            if not self.pool.reserve(seq, need):
                self.pool.release(seq)
                return
            self.waiting.popleft()
            r._seq = seq
            self.prefilling.append(r)

    def _prefill(self) -> None:
        """One call over the next chunks of the admitted prompts, ``prefill_chunk`` tokens in all,
        left-padded so that every row's last token is the call's last position."""
        budget, rows, chunks = self.prefill_chunk, [], []
        fresh = self.prefilling[0]._seq.length == 0
        for r in self.prefilling:
            if budget == 0:
                break
            # A prompt adapter enters only into an empty cache, so fresh and continuing rows go apart.
            if self.model.prompt_adapter is not None and (r._seq.length == 0) != fresh:
                continue
            chunk, r._todo = r._todo[:budget], r._todo[budget:]
            budget -= len(chunk)
            rows.append(r)
            chunks.append(chunk)
        tokens, mask = left_pad(chunks, self.model.cfg.pad_token_id or 0, self.model.device)
        logits = self.model(tokens, attention_mask=mask, cache=self.pool.batch([r._seq for r in rows]),
                            backend=self.backend, logits_to_keep=1)[:, -1]
        for i, r in enumerate(rows):
            if r._todo:
                continue
            self.prefilling.remove(r)
            self.running.append(r)
            if not r.output:           # a preempted request resumes from its last token instead
                self._accept(r, self._sample(r, logits[i:i + 1]))

    def _decode(self) -> None:
        for r in list(self.running):   # every row needs room for one more token
            while r in self.running and not self.pool.reserve(r._seq, r._seq.length + 1):
                # The newest admitted goes first: a prompt still prefilling, else the last to run.
                self._preempt((self.prefilling or self.running)[-1])
        if not self.running:
            return
        rows = self.running
        tokens = torch.tensor([[r.output[-1]] for r in rows], device=self.model.device)
        logits = self.model(tokens, cache=self.pool.batch([r._seq for r in rows]), backend=self.backend)[:, -1]
        greedy = logits.argmax(-1).tolist()
        for i, r in enumerate(list(rows)):
            tok = greedy[i] if r.sampling.greedy else self._sample(r, logits[i:i + 1])
            self._accept(r, tok)

    def _sample(self, r: Request, logits: torch.Tensor) -> int:
        return int(sample_next(logits, r.sampling, r._generator)[0])

    def _accept(self, r: Request, token: int) -> None:
        r.output.append(token)
        self.stats.generated_tokens += 1
        r.emit(("token", token))
        stop = self.default_stop if r.stop_tokens is None else r.stop_tokens
        if token in stop:
            self._finish(r, "stop")
        elif len(r.output) >= r.max_tokens:
            self._finish(r, "length")

    def _preempt(self, r: Request) -> None:
        """Free ``r``'s blocks; it waits at the front of the queue to be prefilled again."""
        (self.running if r in self.running else self.prefilling).remove(r)
        self.pool.release(r._seq)
        r._seq = None
        r._todo = r.prompt + r.output[:-1]    # the last token is fed by the next decode step
        self.waiting.appendleft(r)
        self.stats.preemptions += 1

    def _finish(self, r: Request, reason: str) -> None:
        for queue in (self.prefilling, self.running):
            if r in queue:
                queue.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        if r._seq is not None:
            self.pool.release(r._seq)
            r._seq = None
        if r.finish_reason is None:
            r.finish_reason = reason
            self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1
            r.emit(("finish", reason))

"""The serving layer's handle on the engine: one engine request per choice, their events merged into
one async stream of text deltas.

The engine steps in a thread of its own; each engine request's sink moves its events onto its
choice's asyncio queue (``call_soon_threadsafe``). Closing the stream (the response is complete,
failed, or its client went away) cancels every engine request still running, and their KV blocks
return to the pool at the engine's next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, NamedTuple

from fastapi import Request

from kvlab.errors import ConfigError
from kvlab.inference.engine import Engine, QueueFull
from kvlab.inference.engine import Request as EngineRequest
from kvlab.serve.errors import APIError, engine_refusal, generation_failed
from kvlab.serve.metrics import ServingMetrics
from kvlab.serve.protocol import GenerationRequest
from kvlab.serve.text import TextStream

__all__ = ["Choice", "ChoiceEvent", "EngineClient"]


class ChoiceEvent(NamedTuple):
    """What one engine event of a choice releases to the client."""

    index: int                      # the choice's index in the response
    text: str                       # the text since the choice's previous event ("" when none)
    finish_reason: str | None       # set on the choice's last event only
    tokens: int                     # tokens the choice has generated so far


@dataclass(eq=False)
class Choice:
    """One choice's engine request, its event queue, and its text and timing so far."""

    request: EngineRequest
    events: asyncio.Queue
    text: TextStream | None         # None: a model without a tokenizer streams its token ids
    tokens: int = 0
    last_token_at: float | None = None
    finished: bool = False

    def on_event(self, kind: str, value, engine: Engine, metrics: ServingMetrics) -> tuple[str, str | None] | None:
        """``(text, finish_reason)`` that the engine event ``(kind, value)`` releases, or None."""
        if self.finished:           # tokens made before the engine saw a stop string
            return None
        if kind == "finish":
            return self._on_finish(value, metrics)
        return self._on_token(value, engine, metrics)

    def _on_finish(self, reason: str, metrics: ServingMetrics) -> tuple[str, str]:
        if reason == "error":
            raise generation_failed(self.request.error)
        self.finished = True
        metrics.finished(reason)
        return (self.text.flush() if self.text is not None else ""), reason

    def _on_token(self, token: int, engine: Engine, metrics: ServingMetrics) -> tuple[str, str | None] | None:
        now = time.perf_counter()
        if self.last_token_at is None:
            metrics.first_token(now - self.request.arrived, len(self.request.prompt))
        else:
            metrics.next_token(now - self.last_token_at)
        self.last_token_at = now
        self.tokens += 1
        delta = self.text.push(token) if self.text is not None else f" {token}"
        if self.text is not None and self.text.stopped:
            # The engine only learns of the stop string now; its next step ends the request.
            self.finished = True
            engine.cancel(self.request, "stop")
            metrics.finished("stop")
            return delta, "stop"
        return (delta, None) if delta else None


@dataclass
class EngineClient:
    """Runs a request's choices on the engine and streams their text back to the event loop."""

    engine: Engine
    tokenizer: Any                  # None: the model has none, and prompts come as token ids
    metrics: ServingMetrics

    def max_tokens(self, request: GenerationRequest, prompt: list[int], default: int | None) -> int:
        """A choice's token limit: the client's, else ``default``, else whatever the context has left."""
        requested = request.requested_max_tokens() or default
        if requested:
            return requested
        # A prefix adapter's virtual tokens take up context as well.
        return max(1, self.engine.max_len - len(prompt) - self.engine.model.n_virtual_tokens)

    async def stream(self, http: Request, request: GenerationRequest, prompts: list[list[int]],
                     default_max_tokens: int | None) -> AsyncGenerator[ChoiceEvent, None]:
        """Submit one engine request per prompt (one per choice); yield their events as they come.

        Without streaming a task watches for the client's disconnection, and this generator then
        returns before every choice finished; a streaming response is cancelled by Starlette when
        its client goes away, which closes this generator. Either way the requests still running
        are cancelled."""
        choices = self._submit_all(request, prompts, default_max_tokens)
        merged: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_pump(i, c.events, merged)) for i, c in enumerate(choices)]
        if not request.stream:
            tasks.append(asyncio.create_task(_watch_disconnect(http, merged)))
        try:
            while not all(c.finished for c in choices):
                i, (kind, value) = await merged.get()
                if kind == "disconnect":
                    return
                released = choices[i].on_event(kind, value, self.engine, self.metrics)
                if released is not None:
                    yield ChoiceEvent(i, *released, choices[i].tokens)
        finally:
            for t in tasks:
                t.cancel()
            for c in choices:
                if c.request.finish_reason is None:
                    self.engine.cancel(c.request)

    def _submit_all(self, request: GenerationRequest, prompts: list[list[int]],
                    default_max_tokens: int | None) -> list[Choice]:
        # All or none: a refused choice cancels those queued before it.
        choices: list[Choice] = []
        try:
            for i, prompt in enumerate(prompts):
                choices.append(self._submit(request, prompt, self.max_tokens(request, prompt, default_max_tokens), i))
        except APIError:
            for c in choices:
                self.engine.cancel(c.request)
            raise
        return choices

    def _submit(self, request: GenerationRequest, prompt: list[int], max_tokens: int, index: int) -> Choice:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = None if request.seed is None else request.seed + index     # the n choices of a seed differ
        engine_request = EngineRequest(prompt, max_tokens, request.sampling_params(), seed=seed,
                                       stop_tokens=frozenset() if request.ignore_eos else None,
                                       sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            self.engine.submit(engine_request)
        except (QueueFull, ConfigError) as e:
            raise engine_refusal(e) from None
        text = TextStream(self.tokenizer, request.stop_strings()) if self.tokenizer is not None else None
        return Choice(engine_request, events, text)


async def _pump(index: int, events: asyncio.Queue, merged: asyncio.Queue) -> None:
    """Move one choice's events onto the merged queue until its finish event."""
    while True:
        ev = await events.get()
        await merged.put((index, ev))
        if ev[0] == "finish":
            return


async def _watch_disconnect(http: Request, merged: asyncio.Queue) -> None:
    """Put a disconnect event on the merged queue as soon as the client goes away."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    await merged.put((None, ("disconnect", None)))

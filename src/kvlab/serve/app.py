"""The OpenAI-compatible HTTP API (FastAPI) over an :class:`~kvlab.inference.engine.Engine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's chat template),
both streaming as server-sent events with ``"stream": true``; ``GET /v1/models``; ``GET /health``;
``GET /metrics`` (Prometheus text: requests, tokens, tokens/s, time to first token, time per output
token, queue length, running sequences, KV blocks in use, preemptions).

The engine steps in a thread of its own; each request hands it a sink that moves events onto the
request's asyncio queue. A client that disconnects — mid-stream or while waiting for a whole
answer — has its request cancelled, and its KV blocks return to the pool at the next step.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a request
kvlab cannot serve as written (bad JSON, a wrong field, a prompt longer than the context), 404 for
an unknown model, 429 when the waiting queue is full, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from kvlab.errors import ConfigError
from kvlab.inference.engine import Engine, QueueFull
from kvlab.inference.engine import Request as EngineRequest
from kvlab.inference.generation import SamplingParams
from kvlab.serve.text import TextStream

__all__ = ["create_app"]


# ------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")     # OpenAI clients send fields kvlab ignores (user, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)          # vLLM's extensions: top_k, ignore_eos
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ------------------------------------------------------------------------------------ metrics
class _Metrics:
    """Prometheus metrics: counters and histograms kept here, engine state read at each scrape."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.engine = engine
        self.requests = Counter("kvlab_requests", "finished requests", ["finish_reason"], registry=self.registry)
        self.prompt_tokens = Counter("kvlab_prompt_tokens", "prompt tokens of admitted requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("kvlab_generation_tokens", "tokens generated", registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("kvlab_time_to_first_token_seconds", "arrival to first token", buckets=buckets,
                              registry=self.registry)
        self.tpot = Histogram("kvlab_time_per_output_token_seconds", "time between a request's tokens",
                              buckets=buckets, registry=self.registry)
        self._recent: deque[tuple[float, int]] = deque()
        self.registry.register(self)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now, total = time.perf_counter(), self.engine.stats.generated_tokens
        self._recent.append((now, total))
        while len(self._recent) > 1 and now - self._recent[0][0] > window:
            self._recent.popleft()
        t0, n0 = self._recent[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0

    def collect(self):
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
        return []


# -------------------------------------------------------------------------------------- the app
def create_app(engine: Engine, tokenizer, model_name: str, *, start_engine: bool = True) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; its lifespan runs the engine's thread."""
    metrics = _Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=engine.run_forever, name="kvlab-engine", daemon=True)
        if start_engine:
            thread.start()
        try:
            yield
        finally:
            engine.stop()
            if start_engine:
                thread.join(timeout=30)

    app = FastAPI(title="kvlab", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kvlab", "max_model_len": engine.max_len}]}

    def check_common(body: _Body) -> None:
        if body.model != model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{model_name}`",
                           "invalid_request_error", "model", "model_not_found")
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; leave them at 0",
                           param="presence_penalty")
        if body.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if body.stop and tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer, which this model does not have", param="stop")

    def sampling(body: _Body) -> SamplingParams:
        return SamplingParams(body.temperature, body.top_k, body.top_p if body.top_p < 1 else None)

    def encode_prompts(body: CompletionBody) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            return [tokenizer.encode(t) for t in ([p] if isinstance(p, str) else p)]
        if not p:
            raise APIError(400, "prompt: the prompt is empty", param="prompt")
        return [list(p)] if isinstance(p[0], int) else [list(x) for x in p]

    def chat_prompt(body: ChatBody) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "chat needs the model's tokenizer and chat template, which this model does not have")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):      # content parts: kvlab models read the text parts
                if any(part.get("type") != "text" for part in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(part.get("text", "") for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ConfigError as e:
            raise APIError(400, str(e), param="messages") from None

    async def submit(prompt: list[int], body: _Body, max_tokens: int, index: int):
        """Queue one choice: ``(engine request, its event queue)``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = None if body.seed is None else body.seed + index
        req = EngineRequest(prompt, max_tokens, sampling(body), seed=seed,
                            stop_tokens=frozenset() if body.ignore_eos else None,
                            sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            engine.submit(req)
        except QueueFull as e:
            status = 503 if "shutting down" in str(e) else 429
            raise APIError(status, str(e), "server_busy" if status == 503 else "rate_limit_exceeded") from None
        except ConfigError as e:
            raise APIError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "prompt") from None
        return req, events

    def limit(body: _Body, prompt: list[int], default: int | None) -> int:
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens or default
        return requested if requested else max(1, engine.max_len - len(prompt) - engine.model.n_virtual_tokens)

    async def choices(http: Request, prompts: list[list[int]], body: _Body, default_max: int | None):
        """Submit every choice; yield ``(index, text delta, finish_reason or None, tokens so far)``.

        Without streaming a task here watches for the client's disconnection; a streaming response
        is cancelled by Starlette when its client goes away, which closes this generator. Either
        way the requests still running are cancelled."""
        subs = []
        try:
            for i, prompt in enumerate(prompts):
                subs.append((*await submit(prompt, body, limit(body, prompt, default_max), i), prompt))
        except APIError:
            for req, _, _ in subs:
                engine.cancel(req)
            raise
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, events):
            while True:
                ev = await events.get()
                await merged.put((i, ev))
                if ev[0] == "finish":
                    return

        async def watch():                     # a whole answer: notice a client that goes away at once
            while (await http.receive())["type"] != "http.disconnect":
                pass
            await merged.put((None, ("disconnect", None)))

        tasks = [asyncio.create_task(pump(i, ev)) for i, (_, ev, _) in enumerate(subs)]
        if not body.stream:
            tasks.append(asyncio.create_task(watch()))
        streams = [TextStream(tokenizer, stops) if tokenizer is not None else None for _ in subs]
        last: list[float | None] = [None] * len(subs)
        ntok = [0] * len(subs)
        finished = [False] * len(subs)
        try:
            while not all(finished):
                i, (kind, value) = await merged.get()
                if kind == "disconnect":
                    return
                if finished[i]:                    # tokens made before the engine saw a stop string
                    continue
                req, _, prompt = subs[i]
                stream = streams[i]
                if kind == "finish" and value == "error":
                    raise APIError(500, f"generation failed: {req.error}", "server_error")
                if kind == "finish":
                    finished[i] = True
                    metrics.requests.labels(value).inc()
                    yield i, (stream.flush() if stream is not None else ""), value, ntok[i]
                    continue
                now = time.perf_counter()
                if last[i] is None:
                    metrics.ttft.observe(now - req.arrived)
                    metrics.prompt_tokens.inc(len(prompt))
                else:
                    metrics.tpot.observe(now - last[i])
                last[i] = now
                ntok[i] += 1
                metrics.generation_tokens.inc()
                delta = stream.push(value) if stream is not None else f" {value}"
                if stream is not None and stream.stopped:
                    finished[i] = True
                    engine.cancel(req, "stop")
                    metrics.requests.labels("stop").inc()
                    yield i, delta, "stop", ntok[i]
                elif delta:
                    yield i, delta, None, ntok[i]
        finally:
            for t in tasks:
                t.cancel()
            for req, _, _ in subs:
                if req.finish_reason is None:
                    engine.cancel(req)

    def usage(tokens: dict[int, int], prompts) -> dict[str, int]:
        completion = sum(tokens.values())
        prompt = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(http: Request, body: _Body, prompts: list[list[int]], chat: bool, default_max: int | None):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        gen = choices(http, prompts, body, default_max)
        if not body.stream:
            texts = [""] * len(prompts)
            reasons: list[str | None] = [None] * len(prompts)
            tokens: dict[int, int] = {}
            async for i, delta, reason, n in gen:
                texts[i] += delta
                tokens[i] = n
                if reason is not None:
                    reasons[i] = reason
            if None in reasons:                    # the client went away
                return JSONResponse({}, status_code=499)
            if chat:
                out = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
            else:
                out = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
            return {"id": rid, "object": obj, "created": now, "model": model_name, "choices": out,
                    "usage": usage(tokens, prompts)}

        # Streaming: the first event is pulled before the response starts, so that a request the
        # engine refuses (429, 400) is still an HTTP error and not a broken stream.
        first = await anext(gen, None)
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(i: int, delta: str, reason: str | None, role: bool = False) -> str:
            if chat:
                d = ({"role": "assistant", "content": delta} if role else {"content": delta} if delta or not reason
                     else {})
                c = {"index": i, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                c = {"index": i, "text": delta, "logprobs": None, "finish_reason": reason}
            return "data: " + json.dumps({"id": rid, "object": obj + (".chunk" if chat else ""), "created": now,
                                          "model": model_name, "choices": [c]}) + "\n\n"

        async def sse() -> AsyncIterator[str]:
            tokens: dict[int, int] = {}
            try:
                if chat:
                    for i in range(len(prompts)):
                        yield chunk(i, "", None, role=True)
                item = first
                while item is not None:
                    i, delta, reason, n = item
                    tokens[i] = n
                    yield chunk(i, delta, reason)
                    try:
                        item = await anext(gen, None)
                    except APIError as e:    # mid-stream: an error event, as vLLM sends, then the end
                        yield "data: " + json.dumps({"error": {"message": e.message, "type": e.type, "param": None,
                                                               "code": e.code}}) + "\n\n"
                        break
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": obj + (".chunk" if chat else ""), "created": now,
                                                 "model": model_name, "choices": [],
                                                 "usage": usage(tokens, prompts)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await gen.aclose()               # a client that went away cancels its requests

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def parse(http: Request, model_cls):
        try:
            raw = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return model_cls.model_validate(raw)
        except Exception as e:                 # pydantic's ValidationError: one line per the first error
            errors = getattr(e, "errors", lambda: [])()
            if not errors:
                raise APIError(400, str(e)) from None
            first = errors[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise APIError(400, f"{where}: {first.get('msg')}", param=where or None) from None

    @app.post("/v1/completions")
    async def completions(http: Request):
        body = await parse(http, CompletionBody)
        check_common(body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompts = encode_prompts(body)
        if len(prompts) * body.n > 16:
            raise APIError(400, f"{len(prompts)} prompts × n={body.n} choices is more than 16 per request", param="n")
        expanded = [p for p in prompts for _ in range(body.n)]
        return await respond(http, body, expanded, chat=False, default_max=16)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        body = await parse(http, ChatBody)
        check_common(body)
        prompt = chat_prompt(body)
        return await respond(http, body, [prompt] * body.n, chat=True, default_max=None)

    return app

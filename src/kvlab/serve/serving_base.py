"""What every generating endpoint shares (:class:`OpenAIServing`): reading and checking the request
body, running its choices on the engine, and answering with one JSON body or a stream of
server-sent events. A subclass says how its prompts are made and what one of its choices looks like.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from kvlab.serve.engine_client import ChoiceEvent, EngineClient
from kvlab.serve.errors import APIError
from kvlab.serve.protocol import GenerationRequest, UsageInfo
from kvlab.serve.serving_models import OpenAIServingModels

__all__ = ["SSE_DONE", "OpenAIServing", "sse_event"]

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return "data: " + json.dumps(payload.model_dump()) + "\n\n"


class OpenAIServing:
    """The shared half of a generating endpoint; subclasses fill in the class attributes and hooks."""

    request_cls: type[GenerationRequest]
    response_cls: type[BaseModel]          # the whole answer: id, object, created, model, choices, usage
    stream_response_cls: type[BaseModel]   # one chunk of a stream: the same fields, usage only in the last
    id_prefix: str                         # of the response's id ("cmpl-", "chatcmpl-")
    default_max_tokens: int | None = None  # None: up to the end of the context

    def __init__(self, client: EngineClient, models: OpenAIServingModels):
        self.client = client
        self.models = models

    @property
    def tokenizer(self):
        return self.client.tokenizer

    # ----------------------------------------------------------------------------- hooks
    def _choice(self, index: int, text: str, finish_reason: str | None) -> BaseModel:
        """One choice of the whole answer."""
        raise NotImplementedError

    def _stream_choice(self, index: int, text: str, finish_reason: str | None) -> BaseModel:
        """One choice's delta in a stream chunk."""
        raise NotImplementedError

    def _opening_chunks(self, header: dict[str, Any], n: int) -> list[BaseModel]:
        """Chunks a stream starts with, before any text (none unless a subclass sends some)."""
        return []

    # ----------------------------------------------------------------- reading the request
    async def _parse(self, http: Request) -> Any:
        """The body as ``request_cls``; any fault is a 400 naming the first wrong field."""
        try:
            raw = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return self.request_cls.model_validate(raw)
        except Exception as e:                 # pydantic's ValidationError: one line per the first error
            errors = getattr(e, "errors", lambda: [])()
            if not errors:
                raise APIError(400, str(e)) from None
            first = errors[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise APIError(400, f"{where}: {first.get('msg')}", param=where or None) from None

    def _check(self, request: GenerationRequest) -> None:
        """Refuse what kvlab does not serve: another model, penalties, logprobs, stop strings without a tokenizer."""
        self.models.check_model(request.model)
        if request.presence_penalty or request.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; leave them at 0",
                           param="presence_penalty")
        if request.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if request.stop and self.tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer, which this model does not have", param="stop")

    # ------------------------------------------------------------------------- answering
    async def _serve(self, http: Request, request: GenerationRequest, prompts: list[list[int]]) -> Response:
        """Run one choice per prompt and answer, whole or streamed as ``request`` asks."""
        header = {"id": self.id_prefix + uuid.uuid4().hex, "created": int(time.time()), "model": self.models.name}
        events = self.client.stream(http, request, prompts, self.default_max_tokens)
        if not request.stream:
            return await self._whole(events, header, prompts)
        # The first event is pulled before the response starts, so that a request the engine
        # refuses (429, 400) is still an HTTP error and not a broken stream.
        first = await anext(events, None)
        return StreamingResponse(self._sse(events, first, header, prompts, request.include_usage()),
                                 media_type="text/event-stream")

    async def _whole(self, events: AsyncGenerator[ChoiceEvent, None], header: dict[str, Any],
                     prompts: list[list[int]]) -> Response:
        """The answer as one JSON body, once every choice finished."""
        texts = [""] * len(prompts)
        reasons: list[str | None] = [None] * len(prompts)
        tokens: dict[int, int] = {}
        async for event in events:
            texts[event.index] += event.text
            tokens[event.index] = event.tokens
            if event.finish_reason is not None:
                reasons[event.index] = event.finish_reason
        if None in reasons:                    # the client went away
            return JSONResponse({}, status_code=499)
        choices = [self._choice(i, text, reason) for i, (text, reason) in enumerate(zip(texts, reasons))]
        body = self.response_cls(**header, choices=choices, usage=UsageInfo.of(prompts, tokens))
        return JSONResponse(body.model_dump())

    async def _sse(self, events: AsyncGenerator[ChoiceEvent, None], first: ChoiceEvent | None, header: dict[str, Any],
                   prompts: list[list[int]], include_usage: bool) -> AsyncIterator[str]:
        """The answer as server-sent events: a chunk per event, the usage if asked, then ``[DONE]``."""
        tokens: dict[int, int] = {}
        try:
            for chunk in self._opening_chunks(header, len(prompts)):
                yield sse_event(chunk)
            event = first
            while event is not None:
                tokens[event.index] = event.tokens
                choice = self._stream_choice(event.index, event.text, event.finish_reason)
                yield sse_event(self.stream_response_cls(**header, choices=[choice]))
                try:
                    event = await anext(events, None)
                except APIError as e:          # mid-stream: an error event, as vLLM sends, then the end
                    yield e.stream_event()
                    break
            if include_usage:
                yield sse_event(self.stream_response_cls(**header, choices=[], usage=UsageInfo.of(prompts, tokens)))
            yield SSE_DONE
        finally:
            await events.aclose()              # a client that went away cancels its requests

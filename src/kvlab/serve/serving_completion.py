"""``POST /v1/completions``: text or token-id prompts, each continued ``n`` times."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from kvlab.serve.errors import APIError
from kvlab.serve.protocol import (
    MAX_CHOICES,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from kvlab.serve.serving_base import OpenAIServing

__all__ = ["OpenAIServingCompletion"]


class OpenAIServingCompletion(OpenAIServing):
    """The completions endpoint: prompts as given, choices as ``{"text": ...}``."""

    request_cls = CompletionRequest
    response_cls = CompletionResponse
    stream_response_cls = CompletionStreamResponse
    id_prefix = "cmpl-"
    default_max_tokens = 16           # OpenAI's default for completions

    async def create_completion(self, http: Request) -> Response:
        """Answer one completions request."""
        request: CompletionRequest = await self._parse(http)
        self._check(request)
        if request.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompts = self._encode_prompts(request)
        if len(prompts) * request.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts × n={request.n} choices is more than {MAX_CHOICES} per "
                                f"request", param="n")
        return await self._serve(http, request, [p for p in prompts for _ in range(request.n)])

    def _encode_prompts(self, request: CompletionRequest) -> list[list[int]]:
        """The prompts as token ids, whichever of OpenAI's four forms they came in."""
        p = request.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            return [self.tokenizer.encode(t) for t in ([p] if isinstance(p, str) else p)]
        if not p:
            raise APIError(400, "prompt: the prompt is empty", param="prompt")
        return [list(p)] if isinstance(p[0], int) else [list(x) for x in p]

    def _choice(self, index: int, text: str, finish_reason: str | None) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, finish_reason=finish_reason)

    def _stream_choice(self, index: int, text: str, finish_reason: str | None) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, finish_reason=finish_reason)

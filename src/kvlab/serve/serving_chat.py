"""``POST /v1/chat/completions``: messages rendered with the model's chat template."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from kvlab.errors import ConfigError
from kvlab.serve.errors import APIError
from kvlab.serve.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatStreamChoice,
    DeltaMessage,
)
from kvlab.serve.serving_base import OpenAIServing

__all__ = ["OpenAIServingChat"]


class OpenAIServingChat(OpenAIServing):
    """The chat endpoint: one templated prompt, ``n`` choices as assistant messages."""

    request_cls = ChatCompletionRequest
    response_cls = ChatCompletionResponse
    stream_response_cls = ChatCompletionStreamResponse
    id_prefix = "chatcmpl-"
    default_max_tokens = None         # as OpenAI's chat: up to the end of the context

    async def create_chat_completion(self, http: Request) -> Response:
        """Answer one chat completions request."""
        request: ChatCompletionRequest = await self._parse(http)
        self._check(request)
        prompt = self._chat_prompt(request)
        return await self._serve(http, request, [prompt] * request.n)

    def _chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        """The messages as token ids, through the tokenizer's chat template."""
        if self.tokenizer is None:
            raise APIError(400, "chat needs the model's tokenizer and chat template, which this model does not have")
        messages = []
        for m in request.messages:
            content = m.content
            if isinstance(content, list):      # content parts: kvlab models read the text parts
                if any(part.get("type") != "text" for part in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(part.get("text", "") for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ConfigError as e:
            raise APIError(400, str(e), param="messages") from None

    def _opening_chunks(self, header: dict[str, Any], n: int) -> list[ChatCompletionStreamResponse]:
        # OpenAI's streams name the assistant role once per choice, before any content.
        return [ChatCompletionStreamResponse(**header, choices=[ChatStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""), finish_reason=None)]) for i in range(n)]

    def _choice(self, index: int, text: str, finish_reason: str | None) -> ChatCompletionChoice:
        return ChatCompletionChoice(index=index, message=AssistantMessage(content=text), finish_reason=finish_reason)

    def _stream_choice(self, index: int, text: str, finish_reason: str | None) -> ChatStreamChoice:
        # The last chunk of a choice has an empty delta when its text ended before it.
        delta = DeltaMessage(content=text) if text or not finish_reason else DeltaMessage()
        return ChatStreamChoice(index=index, delta=delta, finish_reason=finish_reason)

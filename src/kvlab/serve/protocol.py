"""The OpenAI API's shapes as kvlab serves them: request bodies, responses, stream chunks, errors.

Responses are dumped with ``model_dump()`` and keep their fields' order, which is the order
OpenAI's own answers use. A field that OpenAI leaves out rather than sending as ``null`` (a chat
delta's ``role``, a chunk's ``usage``) is dropped by :class:`_OmitNone`'s serializer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from kvlab.inference.generation import SamplingParams

__all__ = [
    "MAX_CHOICES", "AssistantMessage", "ChatCompletionChoice", "ChatCompletionRequest", "ChatCompletionResponse",
    "ChatCompletionStreamResponse", "ChatMessage", "ChatStreamChoice", "CompletionChoice", "CompletionRequest",
    "CompletionResponse", "CompletionStreamResponse", "DeltaMessage", "ErrorInfo", "ErrorResponse",
    "GenerationRequest", "ModelCard", "ModelList", "UsageInfo",
]


MAX_CHOICES = 16          # choices in one request: n, and prompts × n for completions


# ------------------------------------------------------------------------------- request bodies
class GenerationRequest(BaseModel):
    """The fields completions and chat share: the model, sampling, stopping and streaming."""

    model_config = ConfigDict(extra="allow")     # OpenAI clients send fields kvlab ignores (user, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)          # vLLM's extensions: top_k, ignore_eos
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None

    def sampling_params(self) -> SamplingParams:
        """The engine's sampling settings (``top_p`` of 1 means no nucleus cut)."""
        return SamplingParams(self.temperature, self.top_k, self.top_p if self.top_p < 1 else None)

    def stop_strings(self) -> list[str]:
        """``stop`` as a list, whichever of OpenAI's forms the client sent."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        """The client's token limit for each choice, None when it set none."""
        return self.max_tokens

    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk carrying the usage."""
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: text prompts or token-id prompts, one or several."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ChatMessage(BaseModel):
    """One message of a chat request; ``content`` is text or a list of content parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``: messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        # OpenAI renamed max_tokens for chat; the new name wins when a client sends both.
        return self.max_completion_tokens or self.max_tokens


# ------------------------------------------------------------------------------------ responses
class _OmitNone(BaseModel):
    """A model whose fields that are None are left out of its dump, not sent as null."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class UsageInfo(BaseModel):
    """Token counts of one response, summed over its choices."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompts: list[list[int]], generated: dict[int, int]) -> UsageInfo:
        """The usage of ``prompts`` (one per choice) and ``generated`` tokens per choice index."""
        prompt, completion = sum(len(p) for p in prompts), sum(generated.values())
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionChoice(BaseModel):
    """One choice of a completion, whole or (as a chunk's) the text since the last chunk."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(_OmitNone):
    """One server-sent event of a streamed completion: a choice's delta, or (last) the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(_OmitNone):
    """What a chat chunk adds to its message: the role once, then content."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionStreamResponse(_OmitNone):
    """One server-sent event of a streamed chat: a choice's delta, or (last) the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvlab"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------------------- errors
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo

"""Errors in OpenAI's shape, and the HTTP status each of kvlab's refusals maps to.

400 for a request kvlab cannot serve as written (bad JSON, a wrong field, a prompt longer than the
context), 404 for an unknown model, 429 when the waiting queue is full, 503 while shutting down,
500 when the engine's step fails.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from kvlab.errors import ConfigError
from kvlab.inference.engine import QueueFull
from kvlab.serve.protocol import ErrorInfo, ErrorResponse

__all__ = ["APIError", "api_error_handler", "engine_refusal", "generation_failed"]


class APIError(Exception):
    """A request answered with an OpenAI error body and ``status`` instead of a generation."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)

    def stream_event(self) -> str:
        """The error as the last server-sent event of a stream whose status was sent already.

        ``param`` is always null here: a stream only fails after its request was accepted."""
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=None, code=self.code))
        return "data: " + json.dumps(body.model_dump()) + "\n\n"


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    """FastAPI's handler for :class:`APIError`, wherever in a route it is raised."""
    return exc.response()


def engine_refusal(exc: QueueFull | ConfigError) -> APIError:
    """The error for a request the engine would not queue: full or stopping (429, 503), or invalid (400)."""
    if isinstance(exc, QueueFull):
        status = 503 if "shutting down" in str(exc) else 429
        return APIError(status, str(exc), "server_busy" if status == 503 else "rate_limit_exceeded")
    return APIError(400, str(exc), param="max_tokens" if "max_tokens" in str(exc) else "prompt")


def generation_failed(reason: str | None) -> APIError:
    """The error for a request the engine accepted and then failed (its step raised)."""
    return APIError(500, f"generation failed: {reason}", "server_error")

"""The OpenAI-compatible HTTP API (FastAPI) over an :class:`~kvlab.inference.engine.Engine`: the app's wiring.

Endpoints: ``POST /v1/completions`` (``serving_completion.py``), ``POST /v1/chat/completions``
(``serving_chat.py``, the model's chat template), both streaming as server-sent events with
``"stream": true``; ``GET /v1/models`` (``serving_models.py``); ``GET /health``; ``GET /metrics``
(Prometheus text, ``metrics.py``). The routes here only hand each request to its serving object,
kept on ``app.state``; what they share is in ``serving_base.py`` and ``engine_client.py``.

The engine steps in a thread of its own, started and stopped by the app's lifespan. A client that
disconnects, mid-stream or while waiting for a whole answer, has its request cancelled, and its KV
blocks return to the pool at the next step. Errors have OpenAI's shape (``errors.py``).
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse

from kvlab.inference.engine import Engine
from kvlab.serve.engine_client import EngineClient
from kvlab.serve.errors import APIError, api_error_handler
from kvlab.serve.metrics import ServingMetrics
from kvlab.serve.serving_chat import OpenAIServingChat
from kvlab.serve.serving_completion import OpenAIServingCompletion
from kvlab.serve.serving_models import OpenAIServingModels

__all__ = ["create_app"]

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(http: Request):
    return PlainTextResponse(http.app.state.metrics.exposition(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(http: Request):
    return http.app.state.serving_models.show_available_models().model_dump()


@router.post("/v1/completions")
async def completions(http: Request):
    return await http.app.state.serving_completion.create_completion(http)


@router.post("/v1/chat/completions")
async def chat_completions(http: Request):
    return await http.app.state.serving_chat.create_chat_completion(http)


@asynccontextmanager
async def _engine_thread(engine: Engine, start: bool):
    """Run ``engine`` in a thread of its own while the app serves (``start=False``: the caller steps it)."""
    thread = threading.Thread(target=engine.run_forever, name="kvlab-engine", daemon=True)
    if start:
        thread.start()
    try:
        yield
    finally:
        engine.stop()
        if start:
            thread.join(timeout=30)


def create_app(engine: Engine, tokenizer, model_name: str, *, start_engine: bool = True) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; its lifespan runs the engine's thread."""
    app = FastAPI(title="kvlab", lifespan=lambda app: _engine_thread(engine, start_engine))
    metrics = ServingMetrics(engine)
    client = EngineClient(engine, tokenizer, metrics)
    serving_models = OpenAIServingModels(model_name, engine.max_len)
    app.state.metrics = metrics
    app.state.serving_models = serving_models
    app.state.serving_completion = OpenAIServingCompletion(client, serving_models)
    app.state.serving_chat = OpenAIServingChat(client, serving_models)
    app.add_exception_handler(APIError, api_error_handler)
    app.include_router(router)
    return app

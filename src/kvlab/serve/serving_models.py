"""``GET /v1/models``: the one model a kvlab server serves, and the check that a request names it."""

from __future__ import annotations

import time

from kvlab.serve.errors import APIError
from kvlab.serve.protocol import ModelCard, ModelList

__all__ = ["OpenAIServingModels"]


class OpenAIServingModels:
    """The served model's name and card."""

    def __init__(self, name: str, max_model_len: int):
        self.name = name
        self.max_model_len = max_model_len
        self.created = int(time.time())

    def show_available_models(self) -> ModelList:
        """The body of ``GET /v1/models``."""
        return ModelList(data=[ModelCard(id=self.name, created=self.created, max_model_len=self.max_model_len)])

    def check_model(self, requested: str) -> None:
        """Raise a 404 unless ``requested`` is the served model's name."""
        if requested != self.name:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves `{self.name}`",
                           "invalid_request_error", "model", "model_not_found")

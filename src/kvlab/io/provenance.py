"""Provenance records: where a model's weights came from and every step applied since.

``{"source": {"kind": "init"|"hf"|"gguf"|..., ...}, "steps": [{"op": "convert"|"train"|..., ...}],
"saved": <UTC time of the last write>}``, stored as ``provenance.json`` beside the weights. Every
record is built here, so that every producer writes the same shape.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any


def new_provenance(kind: str, **source: Any) -> dict:
    """A record for a model that comes from ``kind`` (``init``, ``hf``, ``gguf``, ...)."""
    return {"source": {"kind": kind, **source}, "steps": []}


def provenance_of(model) -> dict:
    """The model's record, or a fresh ``init`` record for a model made in this process."""
    prov = getattr(model, "provenance", None)
    return prov if prov is not None else new_provenance("init", config=model.cfg.name)


def with_step(prov: dict, op: str, **params: Any) -> dict:
    """A copy of ``prov`` with one more step."""
    return {**prov, "steps": [*prov.get("steps", []), {"op": op, **params}]}


def record_step(model, op: str, *, source=None, **params: Any) -> dict:
    """Append a step to ``model.provenance`` (starting from ``source``'s record when the step made
    ``model`` out of another model, e.g. a conversion) and return the new record."""
    model.provenance = with_step(provenance_of(source if source is not None else model), op, **params)
    return model.provenance


def stamped(prov: dict) -> dict:
    """The record as written to disk: with the time of this write."""
    return {**prov, "saved": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}

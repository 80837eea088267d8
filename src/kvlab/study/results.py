"""The study's result rows: what the protocol measures and the report reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Entry:
    """One measured model."""

    name: str
    variant: str
    origin: str                      # pretrained / loaded / converted / uptrained / continued / from scratch
    method: str | None = None        # conversion method
    alpha: float | None = None       # uptraining budget as a fraction of P (pretraining path)
    uptrain_tokens: int = 0
    train_tokens: int = 0            # tokens this model was trained on in the study, conversions included
    params: int = 0
    n_kv_head: int = 0
    n_kv_layers: int = 0
    kv_bytes_per_token: int = 0      # bf16, kvlab's one formula
    val_ppl: float = float("nan")
    val_bits_per_byte: float = float("nan")
    val_tokens: int = 0
    max_batch: int = 0
    decode_tokens_per_s: float = float("nan")
    decode_step_ms: float = float("nan")
    train_seconds: float = 0.0
    metrics: str | None = None       # metrics.jsonl of its training run (relative to the study dir)
    pareto: bool = False

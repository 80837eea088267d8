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
    matched: str | None = None       # from scratch with MHA's parameter count: "ffn" or "width" widened
    seed: int | None = None          # the study seed of this run (a row of results.json's "runs")
    n_seeds: int = 1                 # rows of "models": how many seeds the means are over
    val_ppl_std: float = 0.0         # ... and the sample standard deviation of their perplexity


# Fields that are the same for every seed of a model or that a mean summarises.
MEAN_FIELDS = ("val_ppl", "val_bits_per_byte", "decode_tokens_per_s", "decode_step_ms", "train_seconds")


def aggregate(runs: list[Entry]) -> list[Entry]:
    """One row per model name over the seeds it ran with: the means of :data:`MEAN_FIELDS`, the
    standard deviation of perplexity (n − 1 in the denominator), the rest from the first seed."""
    import statistics
    from dataclasses import replace

    groups: dict[str, list[Entry]] = {}
    for e in runs:
        groups.setdefault(e.name, []).append(e)
    out = []
    for rows in groups.values():
        row = replace(rows[0], seed=None, n_seeds=len(rows), pareto=False)
        for name in MEAN_FIELDS:
            setattr(row, name, statistics.fmean(getattr(e, name) for e in rows))
        row.val_ppl_std = statistics.stdev(e.val_ppl for e in rows) if len(rows) > 1 else 0.0
        out.append(row)
    return out

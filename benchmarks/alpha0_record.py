"""The results file of the α = 0 conversion benchmarks (``mla_alpha0.py``, ``lowrank_alpha0.py``,
``mla_rope_key.py``): what was measured, on which text and machine, and the rows."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from kvlab.data.corpus import corpus_fingerprint


def write_alpha0_results(out: str | Path, rows: list[dict], *, model: str, docs, max_tokens: int,
                         calibration_tokens: int) -> None:
    meta = {"model": model, "data_fingerprint": corpus_fingerprint(docs), "max_tokens": max_tokens,
            "calibration_tokens": calibration_tokens, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

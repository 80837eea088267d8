"""Names for dtypes, shared by the config, the cache, the planner and the CLI."""

from __future__ import annotations

import torch

from kvlab.errors import ConfigError

_BY_NAME = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64,
    "fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.float64: "fp64", torch.float8_e4m3fn: "fp8"}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``'bf16'``, ``'float16'``, ``torch.float32``... -> a floating ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a floating-point type; use one of {sorted(set(_SHORT.values()))}")
        return dtype
    try:
        return _BY_NAME[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(set(_SHORT.values())))}") from None


def dtype_bytes(dtype: str | torch.dtype) -> int:
    return parse_dtype(dtype).itemsize


def dtype_name(dtype: str | torch.dtype) -> str:
    return _SHORT[parse_dtype(dtype)]

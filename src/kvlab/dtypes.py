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


# ------------------------------------------------------------------ quantized KV caches
# int8 / int4 codes in groups of QUANT_GROUP channels with float16 parameters per group — a scale
# (int8, symmetric) or a scale and a minimum (int4, asymmetric) — see kvlab.cache.quantized; the
# accounting counts them.
KV_QUANT_BITS = {"int8": 8, "int4": 4}
PARAMS_PER_GROUP = {"int8": 1, "int4": 2}
QUANT_GROUP = 32
PARAM_BYTES = 2


def parse_kv_quant(name: str | None) -> str | None:
    """``None``/``'none'`` -> None; ``'int8'``/``'int4'`` -> itself; anything else: one clear error."""
    if name is None or str(name).lower() in ("none", ""):
        return None
    name = str(name).lower()
    if name not in KV_QUANT_BITS:
        raise ConfigError(f"unknown KV quantization {name!r}; use int8, int4 or none")
    return name


def quant_group(width: int) -> int:
    """Channels per scale for vectors of ``width``: 32, or the whole vector when 32 does not divide it."""
    return QUANT_GROUP if width % QUANT_GROUP == 0 else width


def quantized_vector_bytes(width: int, kv_quant: str) -> int:
    """Bytes of one cached vector of ``width`` channels under ``kv_quant``, its float16 parameters included."""
    bits = KV_QUANT_BITS[kv_quant]
    if bits == 4 and width % 2:
        raise ConfigError(f"int4 packs two channels per byte; a cached vector of {width} channels cannot be packed "
                          f"(use int8)")
    return width * bits // 8 + PARAM_BYTES * PARAMS_PER_GROUP[kv_quant] * (width // quant_group(width))


def cache_vector_bytes(width: int, dtype: str | torch.dtype, kv_quant: str | None = None) -> int:
    """Bytes of one cached vector: ``width × bytes(dtype)``, or its quantized size."""
    return quantized_vector_bytes(width, kv_quant) if kv_quant else width * dtype_bytes(dtype)

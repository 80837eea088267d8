"""Names for dtypes, shared by the config, the cache, the planner and the CLI."""

from __future__ import annotations

from dataclasses import dataclass

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
QUANT_GROUP = 32
PARAM_BYTES = 2        # float16 parameters


def quant_group(width: int) -> int:
    """Channels per parameter group for vectors of ``width``: 32, or the whole vector when 32 does
    not divide it (every format groups alike)."""
    return QUANT_GROUP if width % QUANT_GROUP == 0 else width


@dataclass(frozen=True)
class KVQuant:
    """A quantized KV-cache format: float8 values (fp8, e4m3), or integer codes in groups of
    :data:`QUANT_GROUP` channels with float16 parameters per group — a scale (int8, symmetric:
    llama.cpp's q8_0) or a scale and a minimum (int4, asymmetric: q4_1) — see
    :mod:`kvlab.cache.quantized`; the accounting counts them.

    The format is parsed once, where a name enters kvlab (:func:`parse_kv_quant`: the CLI's
    ``--kv-quant``, or the public functions a Python caller names it to — ``generate``, ``evaluate``,
    ``new_cache``, the engine, ``cache_bytes``); the caches and the kinds take this value."""

    name: str
    bits: int
    params_per_group: int        # float16 parameters per group of channels (0: none, a float format)
    # Stored after an orthogonal rotation (a Hadamard transform in blocks of 64 or 32 channels: QuaRot's,
    # which spreads a few large channels over a block, so that a group's levels are not spent on them);
    # attention undoes it exactly (kvlab.cache.quantized.rotate). Same bytes as the format it rotates.
    rotated: bool = False

    def __str__(self) -> str:
        return self.name

    @property
    def codes_name(self) -> str:
        """The format its codes are in (a rotated format's codes are its plain format's)."""
        return self.name.removesuffix("-h")

    @property
    def formats(self) -> tuple["KVQuant", ...]:
        """The formats it stores in: itself (a :class:`MixedKVQuant` has two)."""
        return (self,)

    def param_count(self, width: int) -> int:
        """float16 parameters of one vector of ``width`` channels."""
        return self.params_per_group * (width // quant_group(width))

    @property
    def is_float(self) -> bool:
        """A float format (values stored as they are, rounded), not integer codes with scales."""
        return self.params_per_group == 0

    def vector_bytes(self, width: int) -> int:
        """Bytes of one cached vector of ``width`` channels, its float16 parameters included."""
        if self.bits == 4 and width % 2:
            raise ConfigError(f"int4 packs two channels per byte; a cached vector of {width} channels cannot be "
                              f"packed (use int8)")
        if self.rotated and width % 32:
            raise ConfigError(f"{self.name} rotates blocks of 32 channels; a cached vector of {width} channels is not "
                              f"whole blocks (use {self.codes_name})")
        return width * self.bits // 8 + PARAM_BYTES * self.param_count(width)


# fp8: float8 e4m3 values with no scale (vLLM's --kv-cache-dtype fp8 with its default scales of 1.0),
# saturated at ±448 — keys and values of trained models stay far inside that range.
# int8-h / int4-h: the same formats stored rotated (``rotated`` above).
KV_QUANTS = {"fp8": KVQuant("fp8", 8, 0), "int8": KVQuant("int8", 8, 1), "int4": KVQuant("int4", 4, 2),
             "int8-h": KVQuant("int8-h", 8, 1, rotated=True), "int4-h": KVQuant("int4-h", 4, 2, rotated=True)}


@dataclass(frozen=True)
class MixedKVQuant:
    """Keys in one format and values in another (``int8/int4``: llama.cpp's ``-ctk q8_0 -ctv q4_1``).

    Keys and values do not cost the same when rounded: on SmolLM2-135M int4 keys cost +6.4 %
    perplexity and int4 values +0.4 % (BENCHMARKS, "Keys and values in different precisions"), so
    int8 keys with int4 values keep int8's quality at 0.79 of its bytes. Only a cache that stores keys
    and values as separate entries can hold it (the ``gqa`` kind's; an MLA or low-rank latent is both
    at once): :func:`kvlab.config.accounting.layer_kv_quant` refuses the others in one line."""

    key: KVQuant
    value: KVQuant

    @property
    def name(self) -> str:
        return f"{self.key.name}/{self.value.name}"

    def __str__(self) -> str:
        return self.name

    @property
    def formats(self) -> tuple[KVQuant, KVQuant]:
        return self.key, self.value


def field_formats(kv_quant: KVQuant | MixedKVQuant, n_fields: int) -> tuple[KVQuant, ...]:
    """The format of each of a cache layer's ``n_fields`` per-token fields: one format for all, or for
    a mixed one keys (the first field) and values (the second)."""
    if isinstance(kv_quant, MixedKVQuant):
        if n_fields != 2:
            raise ConfigError(f"a {kv_quant} cache stores keys and values in different formats; this cache layer "
                              f"keeps {n_fields} field(s) per token, not keys and values: use one format")
        return kv_quant.key, kv_quant.value
    return (kv_quant,) * n_fields


@dataclass(frozen=True)
class LayeredKVQuant:
    """A cache format per layer: ``base`` for every layer but those of ``overrides`` (``((layer,
    format), ...)``, sorted by layer). Spelt ``BASE+FORMAT@LAYERS…`` with layers as numbers and ranges:
    ``int8/int4+int8@0-3,7`` keeps int8 keys with int4 values everywhere but layers 0-3 and 7, which
    keep int8 values too. ``kvlab shrink`` allocates one by each layer's estimated effect on the loss
    (:mod:`kvlab.eval.precision`); :func:`kvlab.config.accounting.layer_kv_quant` gives each layer
    its format (and refuses a layer the model does not have)."""

    base: KVQuant | MixedKVQuant
    overrides: tuple[tuple[int, KVQuant | MixedKVQuant], ...]

    def for_layer(self, layer: int) -> KVQuant | MixedKVQuant:
        return dict(self.overrides).get(layer, self.base)

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers named by an override."""
        return tuple(i for i, _ in self.overrides)

    @property
    def name(self) -> str:
        groups: dict[str, list[int]] = {}
        for i, fmt in self.overrides:
            groups.setdefault(fmt.name, []).append(i)
        return self.base.name + "".join(f"+{fmt}@{_ranges(layers)}" for fmt, layers in sorted(groups.items()))

    def __str__(self) -> str:
        return self.name

    @property
    def assigned(self) -> tuple[KVQuant | MixedKVQuant, ...]:
        """The base and every override's format (repeats kept)."""
        return (self.base, *(f for _, f in self.overrides))

    @property
    def formats(self) -> tuple[KVQuant, ...]:
        """Every format some layer stores in, each once."""
        out: list[KVQuant] = []
        for fmt in self.assigned:
            out += [f for f in fmt.formats if f not in out]
        return tuple(out)


def layered_kv_quant(per_layer) -> KVQuant | MixedKVQuant | LayeredKVQuant:
    """One format per layer (a sequence, every entry a format or its name) -> the format itself when
    every layer has the same, else a :class:`LayeredKVQuant` whose base is the most common one."""
    formats = [parse_kv_quant(f) for f in per_layer]
    if not formats or any(f is None or isinstance(f, LayeredKVQuant) for f in formats):
        raise ConfigError("a format per layer needs one quantized format (fp8, int8, int4, keys/values) for each layer")
    names = [f.name for f in formats]
    base = formats[max(range(len(formats)), key=lambda i: (names.count(names[i]), -i))]
    if all(f == base for f in formats):
        return base
    return LayeredKVQuant(base, tuple((i, f) for i, f in enumerate(formats) if f != base))


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2,5'``."""
    out, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def _parse_layers(text: str, spec: str) -> list[int]:
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first:
                raise ValueError
            layers += range(first, last + 1)
    except ValueError:
        raise ConfigError(f"KV quantization {spec!r}: {text!r} is not a list of layers (numbers and ranges from 0: "
                          f"0-3,7)") from None
    return layers


def parse_kv_quant(value) -> KVQuant | MixedKVQuant | LayeredKVQuant | None:
    """``None``/``'none'`` -> None; ``'fp8'``/``'int8'``/``'int4'`` (or a :class:`KVQuant`) -> the format;
    ``'KEYS/VALUES'`` (``'int8/int4'``) -> a :class:`MixedKVQuant`; ``'BASE+FORMAT@LAYERS…'``
    (``'int8/int4+int8@0-3,7'``) -> a :class:`LayeredKVQuant`; anything else: one clear error."""
    if value is None or isinstance(value, (KVQuant, MixedKVQuant, LayeredKVQuant)):
        return value
    name = str(value).lower().replace(" ", "")
    if name in ("none", ""):
        return None
    if "+" in name:
        base, *parts = name.split("+")
        overrides: dict[int, KVQuant | MixedKVQuant] = {}
        for part in parts:
            fmt, at, layers = part.partition("@")
            if not at:
                raise ConfigError(f"KV quantization {value!r}: {part!r} names no layers; write FORMAT@LAYERS "
                                  f"(int8/int4+int8@0-3,7)")
            for i in _parse_layers(layers, str(value)):
                if i in overrides:
                    raise ConfigError(f"KV quantization {value!r} gives layer {i} two formats; name it once")
                overrides[i] = _one_format(fmt, value)
        base_fmt = _one_format(base, value)
        return LayeredKVQuant(base_fmt, tuple(sorted((i, f) for i, f in overrides.items() if f != base_fmt))) \
            if any(f != base_fmt for f in overrides.values()) else base_fmt
    return _one_format(name, value)


def _one_format(name: str, spec) -> KVQuant | MixedKVQuant:
    parts = name.split("/")
    if len(parts) > 2 or not all(p in KV_QUANTS for p in parts):
        raise ConfigError(f"unknown KV quantization {spec!r}; use fp8, int8, int4 (int8-h, int4-h: rotated first), "
                          f"none, keys/values in two of them (int8/int4), or a base with formats for some layers "
                          f"(int8/int4+int8@0-3,7)")
    if len(parts) == 1:
        return KV_QUANTS[name]
    key, val = (KV_QUANTS[p] for p in parts)
    return key if key == val else MixedKVQuant(key, val)


def cache_vector_bytes(width: int, dtype: str | torch.dtype, kv_quant: KVQuant | None = None) -> int:
    """Bytes of one cached vector: ``width × bytes(dtype)``, or its quantized size."""
    return kv_quant.vector_bytes(width) if kv_quant else width * dtype_bytes(dtype)

"""Quantized KV caches: fp8, int8 and int4 storage of every per-token cache entry (full K/V, MLA latents).

``fp8`` keeps each value as a float8 e4m3 number (3 mantissa bits), saturated at ±448, with no
scale: what vLLM's ``--kv-cache-dtype fp8`` stores with its default scales. The integer formats:

Each cached vector (one token's key or value in one KV head, or one token's MLA latent + RoPE key)
is cut into groups of 32 channels (one group when its width is not a multiple of 32) — KIVI's
"per-token" grouping — and each group is stored as integer codes, rounded to nearest, with float16
parameters in llama.cpp's layouts:

- ``int8``: symmetric, ``q8_0``: signed codes and one scale ``absmax / 127``;
- ``int4``: asymmetric, ``q4_1``: codes 0..15, packed two per byte, with a scale ``(max − min) / 15``
  and the group's minimum. Measured on SmolLM2 (4,096 tokens): symmetric int4 (``q4_0``) costs +19 %
  perplexity, asymmetric +6.8 % — keys have a few large channels of one sign, which a symmetric
  range wastes half its codes on.

Bytes per vector: ``width × bits / 8`` plus 2 (int8) or 4 (int4) bytes per group
(:meth:`kvlab.dtypes.KVQuant.vector_bytes`, which the accounting uses): 40 bytes instead of 128
for a 64-wide fp16 K head at int4.

Attention reads the entries as stored where it can: a decode step of a GQA or MLA layer on a CPU goes
through :mod:`kvlab.attention.kernels.quantized_cpu`, which reads the codes and scales directly (no
float copy of the cache is written; no slower than the plain cache, BENCHMARKS "A quantized cache at
no speed cost"). Everywhere else (prefill, masks, GPUs, other kinds) the entries are dequantized, the
new tokens of a call included, so prefill and decode see the same cache. Dequantizing happens one
layer at a time into a :class:`Workspace` that the
model's cache keeps for the purpose: one layer's K/V in the cache dtype, or a few where cross-layer
sharing keeps a producer's entries alive while other layers run. Its buffers are reused step after
step: allocating them afresh made the allocator return and re-map megabytes per layer and step, and
those page faults were half of a quantized decode step on a CPU.

What a kind keeps per sequence (rolling windows, compressed-memory sums, recurrent states) stays in
its own precision: those are bounded, and a running sum would erode when rounded.
"""

from __future__ import annotations

import math

import torch

from kvlab.cache.base import CacheStep, write_entries
from kvlab.dtypes import KVQuant, MixedKVQuant, field_formats, quant_group

__all__ = ["QuantizedEntries", "QuantizedTokenLayer", "Workspace", "decode", "decoded", "dequantize", "encode",
           "quantize", "rotate", "share_workspace", "use_native_quantize"]


_F16_MAX = torch.finfo(torch.float16).max
FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., W)`` -> (codes, float16 parameters). int8: int8 codes ``(..., W)`` and one scale per
    group ``(..., W / group)``. int4: codes packed two per byte ``(..., W / 2)`` uint8 (the even
    channel in the low nibble) and ``(scale, min)`` per group, interleaved ``(..., 2 × W / group)``."""
    W = x.shape[-1]
    g = quant_group(W)
    groups = x.float().reshape(*x.shape[:-1], W // g, g)
    if bits == 8:
        params = (groups.abs().amax(-1) / 127).clamp(max=_F16_MAX).to(torch.float16)
        s = params.float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.round(groups / s.unsqueeze(-1)).clamp(-128, 127).to(torch.int8).reshape(x.shape)
        return codes, params
    low = groups.amin(-1).clamp(-_F16_MAX, _F16_MAX).to(torch.float16)
    scale = ((groups.amax(-1) - low.float()) / 15).clamp(max=_F16_MAX).to(torch.float16)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((groups - low.float().unsqueeze(-1)) / s.unsqueeze(-1)).clamp(0, 15).to(torch.int16)
    pairs = codes.reshape(*x.shape[:-1], W // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return packed, torch.stack([scale, low], dim=-1).flatten(-2)


def dequantize(codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize` (up to its rounding), in ``dtype``."""
    if bits == 8:
        W = codes.shape[-1]
        g = quant_group(W)
        out = codes.float().reshape(*codes.shape[:-1], W // g, g) * params.float().unsqueeze(-1)
        return out.reshape(codes.shape).to(dtype)
    b = codes.to(torch.int16)
    W = codes.shape[-1] * 2
    g = quant_group(W)
    q = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*codes.shape[:-1], W // g, g)
    p = params.float().reshape(*params.shape[:-1], W // g, 2)
    out = q.float() * p[..., :1] + p[..., 1:]
    return out.reshape(*codes.shape[:-1], W).to(dtype)


class Workspace:
    """Reusable float buffers for dequantized entries: ``slot`` s holds the entries of one producer
    layer at a time (:meth:`kvlab.cache.cache.KVCache` gives layers whose readers overlap different
    slots), one buffer per field, grown to the largest shape asked for."""

    def __init__(self):
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}

    def view(self, slot: int, index: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """A ``shape`` tensor over buffer ``(slot, index)``'s memory (its contents are the caller's)."""
        n = math.prod(shape)
        buf = self.buffers.get((slot, index))
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
            buf = torch.empty(n, dtype=dtype, device=device)
            self.buffers[(slot, index)] = buf
        return buf[:n].view(shape)


def share_workspace(cfg, layers: dict[int, object]) -> None:
    """Give the quantized ones of a cache's ``layers`` (layer index -> cache layer) one
    :class:`Workspace`. A producer's entries stay in use until its last reader (a CLA consumer) has
    run, so producers whose spans of readers overlap get different slots (interval colouring; one
    slot without cross-layer sharing)."""
    quantized = {i: layer for i, layer in layers.items() if isinstance(layer, QuantizedTokenLayer)}
    if not quantized:
        return
    sources = cfg.kv_sources
    last_reader = {p: max(i for i, s in enumerate(sources) if s == p) for p in quantized}
    workspace, busy_until = Workspace(), []            # busy_until[slot]: the last reader of its producer
    for p in sorted(quantized):
        slot = next((k for k, until in enumerate(busy_until) if until < p), len(busy_until))
        if slot == len(busy_until):
            busy_until.append(0)
        busy_until[slot] = last_reader[p]
        quantized[p].workspace, quantized[p].slot = workspace, slot


# The same computation as quantize() for float32 rows on a CPU, compiled: set by
# kvlab.attention.kernels.quantized_cpu (a layer above this one), which builds it. It answers None
# where it cannot run (no compiler), and quantize() does the work.
_native_quantize = None


def use_native_quantize(fn) -> None:
    """Register ``fn(x, bits) -> (codes, params) | None``, equal to :func:`quantize` bit for bit."""
    global _native_quantize
    _native_quantize = fn


_HADAMARD: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def rotation_block(width: int) -> int:
    """The block a rotated format turns together: 64 channels (a usual head), else 32."""
    return 64 if width % 64 == 0 else 32


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x (..., W)`` times the block-diagonal normalised Hadamard matrix (blocks of
    :func:`rotation_block`): orthogonal and symmetric, so applying it twice gives ``x`` back, and
    ``rotate(q) · rotate(k) = q · k`` — attention over rotated keys and values needs only the query
    rotated and the output rotated back."""
    W = x.shape[-1]
    n = rotation_block(W)
    key = (n, x.device, x.dtype)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:                       # Sylvester's construction
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / n ** 0.5).to(x.device, x.dtype)
    return (x.reshape(*x.shape[:-1], W // n, n) @ _HADAMARD[key]).reshape(x.shape)


def encode(x: torch.Tensor, fmt: KVQuant) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` in format ``fmt``: (codes or float8 values, float16 parameters or None); a rotated format
    rotates ``x`` first (:func:`rotate`)."""
    if fmt.rotated:
        x = rotate(x.float())
    if fmt.is_float:
        return x.float().clamp(-_FP8_MAX, _FP8_MAX).to(FP8), None
    if _native_quantize is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        out = _native_quantize(x, fmt.bits)
        if out is not None:
            return out
    return quantize(x, fmt.bits)


def decode(codes: torch.Tensor, params: torch.Tensor | None, fmt: KVQuant, dtype: torch.dtype,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`encode` (up to its rounding), in ``dtype``; into ``out`` if given (a
    ``dtype`` tensor of the decoded shape), with no other tensor of that size allocated (but for a
    rotated format, whose rotation back takes one)."""
    if fmt.rotated:
        x = _decode(codes, params, fmt, dtype, out)
        back = rotate(x)
        return back if out is None else out.copy_(back)
    return _decode(codes, params, fmt, dtype, out)


def _decode(codes: torch.Tensor, params: torch.Tensor | None, fmt: KVQuant, dtype: torch.dtype,
            out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        if fmt.is_float:
            return codes.to(dtype)
        return dequantize(codes, params, fmt.bits, dtype)
    if fmt.is_float:
        return _fp8_into(codes, out)
    W = out.shape[-1]
    g = quant_group(W)
    groups = out.view(*out.shape[:-1], W // g, g)
    if fmt.bits == 8:
        out.copy_(codes)
        groups.mul_(params.unsqueeze(-1))
        return out
    pairs = out.view(*out.shape[:-1], W // 2, 2)              # the even channel in the low nibble
    pairs[..., 0].copy_(codes & 0xF)
    pairs[..., 1].copy_(codes >> 4)
    p = params.view(*params.shape[:-1], W // g, 2)
    groups.mul_(p[..., :1]).add_(p[..., 1:])
    return out


def _fp8_into(codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 -> ``out`` through float16, which holds every e4m3 value exactly: the byte's
    exponent and mantissa bits, placed in float16's, read 2^8 times too small (float16's exponent
    bias is 15, e4m3's 7) — subnormals included — and the sign bit goes to float16's. PyTorch's own
    float8 conversion on CPUs is element by element (10x slower measured at 1.5M values)."""
    bits = codes.view(torch.uint8).to(torch.int16)
    sign = bits & 0x80
    bits.bitwise_and_(0x7F).bitwise_left_shift_(7).bitwise_or_(sign.bitwise_left_shift_(8))
    out.copy_(bits.view(torch.float16))
    return out.mul_(256.0)


class QuantizedTokenLayer:
    """A per-token cache layer (one with ``token_fields``) kept as fp8 values, or int8 or int4 codes and scales;
    keys and values each in its own format where ``kv_quant`` is a :class:`~kvlab.dtypes.MixedKVQuant`.

    Built from the layer it replaces — usually allocated on the ``meta`` device, only for its
    shapes — with the same ``update``/``write_prefix`` contract: ``update(*new)`` takes one tensor per
    field of ``inner.token_fields`` and returns them dequantized, slots ``[0, k_len)``.
    """

    def __init__(self, inner, kv_quant: KVQuant | MixedKVQuant, *, device: str | torch.device):
        self.kv_quant = kv_quant
        # Where reads decode to (given by the model's cache; None: fresh tensors), and this layer's slot.
        self.workspace: Workspace | None = None
        self.slot = 0
        self.fields = tuple(inner.token_fields)
        self.formats = dict(zip(self.fields, field_formats(kv_quant, len(self.fields))))   # keys/values may differ
        self.dtype = getattr(inner, self.fields[0]).dtype          # what attention reads
        names = []
        for f, fmt in self.formats.items():
            shape = getattr(inner, f).shape
            W = shape[-1]
            code_dtype = FP8 if fmt.is_float else torch.uint8 if fmt.bits == 4 else torch.int8
            setattr(self, f + "_codes", torch.zeros(*shape[:-1], W * fmt.bits // 8, device=device, dtype=code_dtype))
            names.append(f + "_codes")
            if not fmt.is_float:
                setattr(self, f + "_scales", torch.zeros(*shape[:-1], fmt.param_count(W), device=device,
                                                         dtype=torch.float16))
                names.append(f + "_scales")
        self.token_fields = tuple(names)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.token_fields)

    def update(self, *new: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, ...]:
        return tuple(e.decoded() for e in self.store(*new, step=step))

    def store(self, *new: torch.Tensor, step: CacheStep) -> tuple[QuantizedEntries, ...]:
        """Like :meth:`update`, but the entries come back as stored (decoded only if asked for): what
        a kernel that reads the codes itself takes (:mod:`kvlab.attention.kernels.quantized_cpu`)."""
        for f, x in zip(self.fields, new):
            codes, scales = encode(x, self.formats[f])
            write_entries(getattr(self, f + "_codes"), codes, step)
            if scales is not None:
                write_entries(getattr(self, f + "_scales"), scales, step)
        return tuple(self.entries(f, step.k_len) for f in self.fields)

    def entries(self, field: str, k_len: int) -> QuantizedEntries:
        scales = getattr(self, field + "_scales", None)
        return QuantizedEntries(getattr(self, field + "_codes")[:, :, :k_len],
                                None if scales is None else scales[:, :, :k_len], self.formats[field], self.dtype,
                                self, self.fields.index(field))

    def write_prefix(self, *prefix: torch.Tensor) -> None:
        for f, x in zip(self.fields, prefix):
            codes, scales = encode(x, self.formats[f])
            n = x.shape[2]
            getattr(self, f + "_codes")[:, :, :n] = codes
            if scales is not None:
                getattr(self, f + "_scales")[:, :, :n] = scales


class QuantizedEntries:
    """One field of a quantized layer's entries as stored, slots ``[0, k_len)``: ``codes`` (fp8 values
    or integer codes) and ``params`` (float16 scales, None for fp8), read as ``dtype`` tensors of
    ``width`` channels. :meth:`decoded` decodes them once, into the layer's workspace slot."""

    def __init__(self, codes: torch.Tensor, params: torch.Tensor | None, kv_quant: KVQuant, dtype: torch.dtype,
                 layer: QuantizedTokenLayer | None = None, index: int = 0):
        self.codes, self.params, self.kv_quant, self.dtype = codes, params, kv_quant, dtype
        self.width = codes.shape[-1] * 8 // kv_quant.bits
        self._layer, self._index = layer, index
        self._decoded: torch.Tensor | None = None

    def decoded(self) -> torch.Tensor:
        if self._decoded is None:
            out, ws = None, getattr(self._layer, "workspace", None)
            if ws is not None:
                shape = (*self.codes.shape[:-1], self.width)
                out = ws.view(self._layer.slot, self._index, shape, self.dtype, self.codes.device)
            self._decoded = decode(self.codes, self.params, self.kv_quant, self.dtype, out=out)
        return self._decoded


def decoded(x):
    """``x`` as a tensor: stored entries decoded, a tensor as it is."""
    return x.decoded() if isinstance(x, QuantizedEntries) else x

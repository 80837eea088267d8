"""Quantized KV caches: int8 and int4 storage of every per-token cache entry (full K/V, MLA latents).

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

Attention reads the dequantized entries (the new tokens of a call included, so prefill and decode
see the same cache); dequantizing happens one layer at a time, so the float copy costs one layer's
K/V. What a kind keeps per sequence (rolling windows, compressed-memory sums, recurrent states)
stays in its own precision: those are bounded, and a running sum would erode when rounded.
"""

from __future__ import annotations

import torch

from kvlab.cache.base import CacheStep, write_entries
from kvlab.dtypes import KVQuant, quant_group

__all__ = ["QuantizedTokenLayer", "dequantize", "quantize"]


_F16_MAX = torch.finfo(torch.float16).max


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


class QuantizedTokenLayer:
    """A per-token cache layer (one with ``token_fields``) kept as int8 or int4 codes and scales.

    Built from the layer it replaces — usually allocated on the ``meta`` device, only for its
    shapes — with the same ``update``/``write_prefix`` contract: ``update(*new)`` takes one tensor per
    field of ``inner.token_fields`` and returns them dequantized, slots ``[0, k_len)``.
    """

    def __init__(self, inner, kv_quant: KVQuant, *, device: str | torch.device):
        self.bits = kv_quant.bits
        self.kv_quant = kv_quant
        self.fields = tuple(inner.token_fields)
        self.dtype = getattr(inner, self.fields[0]).dtype          # what attention reads
        names = []
        for f in self.fields:
            shape = getattr(inner, f).shape
            W = shape[-1]
            codes_w = W * self.bits // 8
            setattr(self, f + "_codes", torch.zeros(*shape[:-1], codes_w, device=device,
                                                    dtype=torch.uint8 if self.bits == 4 else torch.int8))
            setattr(self, f + "_scales", torch.zeros(*shape[:-1], kv_quant.param_count(W), device=device,
                                                     dtype=torch.float16))
            names += [f + "_codes", f + "_scales"]
        self.token_fields = tuple(names)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.token_fields)

    def update(self, *new: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, ...]:
        for f, x in zip(self.fields, new):
            codes, scales = quantize(x, self.bits)
            write_entries(getattr(self, f + "_codes"), codes, step)
            write_entries(getattr(self, f + "_scales"), scales, step)
        return tuple(self.read(f, step.k_len) for f in self.fields)

    def read(self, field: str, k_len: int) -> torch.Tensor:
        return dequantize(getattr(self, field + "_codes")[:, :, :k_len], getattr(self, field + "_scales")[:, :, :k_len],
                          self.bits, self.dtype)

    def write_prefix(self, *prefix: torch.Tensor) -> None:
        for f, x in zip(self.fields, prefix):
            codes, scales = quantize(x, self.bits)
            n = x.shape[2]
            getattr(self, f + "_codes")[:, :, :n] = codes
            getattr(self, f + "_scales")[:, :, :n] = scales

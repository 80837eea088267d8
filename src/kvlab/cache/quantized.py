"""Quantized KV caches: int8 and int4 storage of every per-token cache entry (full K/V, MLA latents).

Each cached vector (one token's key or value in one KV head, or one token's MLA latent + RoPE key)
is cut into groups of 32 channels (one group when its width is not a multiple of 32), and each
group is stored as signed integer codes with one float16 scale, ``absmax / (2^(bits−1) − 1)``,
rounded to nearest — llama.cpp's ``q8_0`` / ``q4_0``-style blocks, KIVI's "per-token" grouping.
Bytes per vector: ``width × bits / 8 + 2 × groups`` (:func:`kvlab.dtypes.quantized_vector_bytes`,
which the accounting uses, scales included): 34 bytes instead of 128 for a 64-wide fp16 K head
at int4.

Attention reads the dequantized entries (the new tokens of a call included, so prefill and decode
see the same cache); dequantizing happens one layer at a time, so the float copy costs one layer's
K/V. What a kind keeps per sequence (rolling windows, compressed-memory sums, recurrent states)
stays in its own precision: those are bounded, and a running sum would erode when rounded.
"""

from __future__ import annotations

import torch

from kvlab.cache.base import CacheStep, write_entries
from kvlab.dtypes import KV_QUANT_BITS, quant_group

__all__ = ["QuantizedTokenLayer", "dequantize", "quantize"]


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., W)`` -> (codes, float16 scales ``(..., W / group)``); int4 codes are packed two per
    byte (``(..., W / 2)`` uint8, the even channel in the low nibble)."""
    W = x.shape[-1]
    g = quant_group(W)
    qmax = 2 ** (bits - 1) - 1
    groups = x.float().reshape(*x.shape[:-1], W // g, g)
    scales = (groups.abs().amax(-1) / qmax).clamp(max=torch.finfo(torch.float16).max).to(torch.float16)
    s = scales.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(groups / s.unsqueeze(-1)).clamp(-qmax - 1, qmax).to(torch.int8).reshape(x.shape)
    if bits == 4:
        pairs = (codes.to(torch.int16) & 0xF).reshape(*x.shape[:-1], W // 2, 2)
        codes = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize` (up to its rounding), in ``dtype``."""
    if bits == 4:
        b = codes.to(torch.int16)
        nibbles = torch.stack([b & 0xF, (b >> 4) & 0xF], dim=-1)
        q = (nibbles - 16 * (nibbles >= 8).to(torch.int16)).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
    else:
        q = codes
    W = q.shape[-1]
    g = quant_group(W)
    out = q.float().reshape(*q.shape[:-1], W // g, g) * scales.float().unsqueeze(-1)
    return out.reshape(q.shape).to(dtype)


class QuantizedTokenLayer:
    """A per-token cache layer (one with ``token_fields``) kept as int8 or int4 codes and scales.

    Built from the layer it replaces — usually allocated on the ``meta`` device, only for its
    shapes — with the same ``update``/``write_prefix`` contract: ``update(*new)`` takes one tensor per
    field of ``inner.token_fields`` and returns them dequantized, slots ``[0, k_len)``.
    """

    def __init__(self, inner, kv_quant: str, *, device: str | torch.device):
        self.bits = KV_QUANT_BITS[kv_quant]
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
            setattr(self, f + "_scales", torch.zeros(*shape[:-1], W // quant_group(W), device=device,
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

"""Decode attention straight from a quantized KV cache on CPUs (fp8, int8, int4; keys and values may
differ, as in an ``int8/int4`` cache).

Dequantizing the cache into a float copy and calling SDPA writes four bytes per cached value and
reads them back on every step: on SmolLM2 (batch 4, one thread) that made a decode step 1.09-1.25x
the plain cache's at 512 tokens and 1.2-1.5x at 2,048 (BENCHMARKS, "A quantized cache at no speed
cost"). This kernel (``quantized_cpu.cpp``) reads the codes and scales where they are stored, turns 8
channels at a time into floats in registers, and uses them at once, as llama.cpp's CPU kernels do with
its q8_0/q4_1 caches: it reads a quarter (int8, fp8) or an eighth (int4) of the plain cache's bytes.

It serves decode calls only: each batch row's queries see the first ``len`` keys of its row (no mask,
or one token per row of a ragged batch, as continuous batching has), no bias, float32 queries on a
CPU, no gradient, widths of 8s (fp8) or whose groups have 8s (int8) or 16s (int4). For anything else
:func:`decode_lengths` answers ``None`` and the caller decodes the entries and goes through a backend
as before.

The same library quantizes the new entries of each step (``quantize_rows``, bit for bit
:func:`kvlab.cache.quantized.quantize`, registered with the cache layer at import): one call instead of
some 25 small tensor operations per layer.

The C++ source is compiled with PyTorch's extension builder the first time a process needs it (about
30 s on a 2-core machine, then cached per machine under ``TORCH_EXTENSIONS_DIR``); where no compiler
is available kvlab says so once and keeps the dequantizing path.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from kvlab.attention.kernels.common import prefix_lengths
from kvlab.cache.quantized import QuantizedEntries, rotate, use_native_quantize
from kvlab.dtypes import quant_group

SOURCE = Path(__file__).with_name("quantized_cpu.cpp")
FORMAT_CODES = {"fp8": 0, "int8": 1, "int4": 2}


@functools.cache
def extension():
    """The compiled kernel module, or None where it cannot be built (said once on stderr)."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    # AVX2 machines get the vector code; the name carries the capability so that machines sharing a
    # build directory never load each other's instructions.
    flags = ["-O3"] + (["-mavx2", "-mfma", "-mf16c"] if capability in ("AVX2", "AVX512") else [])
    name = f"kvlab_quantized_cpu_{capability.lower()}"
    try:
        if not _built(name):
            print("kvlab: building the quantized-cache attention kernel for this CPU (once per machine, "
                  "about 30 s)", file=sys.stderr, flush=True)
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, verbose=False)
    except Exception as e:           # no compiler, no ninja, no headers: the dequantizing path still works
        print(f"kvlab: could not build the quantized-cache attention kernel ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); quantized caches are dequantized before "
              f"attention instead", file=sys.stderr, flush=True)
        return None


def _built(name: str) -> bool:
    """Whether the extension's library is already in PyTorch's build directory (a changed source is
    rebuilt all the same, without the notice)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:
        return False


def decode_lengths(q: torch.Tensor, k: QuantizedEntries, v: QuantizedEntries, mask, bias) -> torch.Tensor | None:
    """How many cached keys each batch row attends to, if the kernel computes this call (see the
    module docstring); None if it does not."""
    B, Hq, Tq, _ = q.shape
    T = k.codes.shape[2]
    fits = (bias is None and q.device.type == "cpu" and q.dtype == torch.float32
            and not (torch.is_grad_enabled() and q.requires_grad)
            and k.kv_quant.codes_name in FORMAT_CODES and v.kv_quant.codes_name in FORMAT_CODES
            and k.dtype == torch.float32 and v.dtype == torch.float32 and Hq % k.codes.shape[1] == 0
            and all(_width_ok(e.width, e.kv_quant) and e.codes.stride(-1) == 1 for e in (k, v)))
    if not fits or (mask is not None and Tq != 1):
        return None
    lengths = prefix_lengths(mask, B, T)
    return None if lengths is None else lengths.to(torch.int64)


def _width_ok(width: int, kv_quant) -> bool:
    """The kernel reads 8 channels at a time, and int4 a group's two halves: groups (32 channels, or the
    whole vector where the width is not a multiple of 32) of a multiple of 8 or 16 channels."""
    if kv_quant.is_float:
        return width % 8 == 0
    return quant_group(width) % (16 if kv_quant.bits == 4 else 8) == 0


def quantized_decode(q: torch.Tensor, k: QuantizedEntries, v: QuantizedEntries, scale: float,
                     lengths: torch.Tensor | None = None) -> torch.Tensor | None:
    """``softmax(q kᵀ · scale) v`` over the first ``lengths[b]`` cached keys of each row (default: all),
    from the codes; None when the kernel is not available. ``q (B, Hq, Tq, Dk)``; query head ``h`` reads
    KV head ``h // (Hq / Hkv)``: the group's query heads become rows of one query block per KV head, so
    each KV head is read once. A row with no keys gets zeros, as every backend gives."""
    ext = extension()
    if ext is None:
        return None
    B, Hq, Tq, D = q.shape
    Hkv = k.codes.shape[1]
    if k.kv_quant.rotated:         # rotated keys: q · k = rotate(q) · rotate(k)
        q = rotate(q)
    rows = (q * scale).reshape(B, Hkv, (Hq // Hkv) * Tq, D).contiguous()
    none = torch.empty(0, dtype=torch.float16)
    if lengths is None:
        lengths = torch.full((B,), k.codes.shape[2], dtype=torch.int64)
    out = ext.quantized_decode(rows, k.codes.view(torch.uint8), none if k.params is None else k.params,
                               v.codes.view(torch.uint8), none if v.params is None else v.params, lengths,
                               FORMAT_CODES[k.kv_quant.codes_name], FORMAT_CODES[v.kv_quant.codes_name], v.width)
    out = out.reshape(B, Hq, Tq, v.width)
    return rotate(out) if v.kv_quant.rotated else out     # the weights' sum of rotated values, rotated back


def attend_stored(q: torch.Tensor, k, v, mask, scale: float, *, backend: str, bias=None) -> torch.Tensor | None:
    """The attention of a layer whose cache returned ``k``/``v`` as stored, computed here when they are
    quantized entries, the backend is the automatic or sdpa one and the kernel serves the call; None
    otherwise (the caller decodes them and calls a backend)."""
    if not isinstance(k, QuantizedEntries) or not isinstance(v, QuantizedEntries) or backend not in ("auto", "sdpa"):
        return None
    lengths = decode_lengths(q, k, v, mask, bias)
    return None if lengths is None else quantized_decode(q, k, v, scale, lengths)


def _quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """kvlab.cache.quantized.quantize, compiled (bit for bit the same; tests/attention/test_quantized_cpu.py)."""
    ext = extension()
    if ext is None:
        return None
    W = x.shape[-1]
    codes, params = ext.quantize_rows(x.reshape(-1, W), bits, quant_group(W))
    return codes.view(*x.shape[:-1], codes.shape[-1]), params.view(*x.shape[:-1], params.shape[-1])


use_native_quantize(_quantize)

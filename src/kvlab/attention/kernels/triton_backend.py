"""The ``triton`` attention backend: launches the kernels of :mod:`kvlab.attention.kernels.triton_kernels`.

- Prefill / training: FlashAttention-2 forward and backward (autograd), any mask kvlab builds;
  a mask other than the plain causal one comes with its tile map as per-tile lists of the tiles to
  visit, so windows and block-sparse layouts cost their visible tiles only.
- Decode (one query per row, no gradient, the allowed keys of each row a prefix ``[0, len)`` —
  what a kvlab KV cache gives): split-KV Flash-Decoding with per-row lengths.

Needs CUDA tensors, or ``TRITON_INTERPRET=1`` to run the same kernels on the CPU (tests).
"""

from __future__ import annotations

import math
import os

import torch

from kvlab.attention.bias import AlibiBias
from kvlab.attention.kernels.common import check_shapes, prefix_lengths
from kvlab.attention.masks import AttentionMask
from kvlab.errors import ConfigError
from kvlab.registry import Backend, register_backend

PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
DECODE_BLOCK_N = 64


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                mask: AttentionMask | None = None, bias=None) -> str | None:
    """Why the kernels cannot compute this call, or None."""
    if not triton_available():
        return "the triton backend needs the 'triton' package: pip install triton"
    if q.device.type != "cuda" and not interpreting():
        return (f"the triton backend runs on CUDA tensors (got {q.device}); on the CPU set "
                f"TRITON_INTERPRET=1 (slow, for tests) or use backend 'flash' or 'sdpa'")
    D = q.shape[-1]
    if D & (D - 1) or not 16 <= D <= 256:
        return f"the triton backend needs head_dim a power of two in [16, 256], got {D}; use backend 'flash' or 'sdpa'"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the triton backend takes fp16, bf16 or fp32 tensors, got {q.dtype}"
    if v is not None and v.shape[-1] != D:
        return f"the triton kernels need value width = key width, got {v.shape[-1]} and {D}"
    if bias is not None and not isinstance(bias, AlibiBias):
        return "the triton kernels add no score bias but ALiBi's; use 'flash', 'sdpa' or 'reference'"
    if bias is not None and mask is None:
        return "ALiBi reads the mask's positions; pass an AttentionMask"
    if mask is not None and mask.k_exempt is not None:
        return "the triton kernels have no window-exempt keys (compressed memory); use 'flash' or 'sdpa'"
    if mask is not None and mask.q_seg is not None:
        return ("the triton backend has no packed-row (segment) masking; train packed SFT rows with "
                "backend 'sdpa' or 'flash', or turn packing off")
    return None


def _check(q: torch.Tensor) -> None:
    reason = unsupported(q)
    if reason is not None:
        raise ConfigError(reason)


def _upcast(q: torch.Tensor) -> bool:
    """Multiply in fp32 inside the kernels: only for bf16 under the interpreter (see _dot)."""
    return interpreting() and q.dtype == torch.bfloat16


def _mask_args(mask: AttentionMask | None, device: torch.device, bias=None):
    """Int32 position/validity vectors with their batch strides (0 = shared by all rows), and
    ALiBi's slopes (fp32, one per query head) when the bias is ALiBi."""
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    slopes = bias.slopes(device).contiguous() if bias is not None else torch.zeros(1, device=device)
    no_sparse = dict(SP_BLOCK=0, SP_LOCAL=0, SP_GLOBAL=0, SP_STRIDE=0)
    if mask is None:
        return dict(tensors=(dummy, dummy, dummy, dummy, slopes), strides=(0, 0, 0, 0),
                    flags=dict(HAS_MASK=False, HAS_QV=False, HAS_KV=False, CAUSAL=False, PLAIN_CAUSAL=False, WINDOW=0,
                               SINKS=0, ALIBI=False, **no_sparse))

    def prep(t):
        if t is None:
            return dummy, 0
        t = t.to(device=device, dtype=torch.int32).contiguous()
        return t, (t.stride(0) if t.shape[0] > 1 else 0)

    (qp, s_qp), (qv, s_qv), (kp, s_kp), (kv, s_kv) = (prep(mask.q_pos), prep(mask.q_valid), prep(mask.k_pos),
                                                      prep(mask.k_valid))
    return dict(tensors=(qp, qv, kp, kv, slopes), strides=(s_qp, s_qv, s_kp, s_kv),
                flags=dict(HAS_MASK=True, HAS_QV=mask.q_valid is not None, HAS_KV=mask.k_valid is not None,
                           CAUSAL=mask.causal, PLAIN_CAUSAL=mask.plain_causal, WINDOW=mask.window or 0,
                           SINKS=mask.sinks if mask.window else 0, ALIBI=bias is not None,
                           **(no_sparse if mask.sparse is None else dict(
                               SP_BLOCK=mask.sparse.block, SP_LOCAL=mask.sparse.local,
                               SP_GLOBAL=mask.sparse.global_blocks, SP_STRIDE=mask.sparse.stride))))


def _tile_lists(mask: AttentionMask | None, device: torch.device, by_key: bool = False):
    """``(counts, indices, row stride, USE_LIST)``: for each query tile (``by_key``: each key tile)
    the number of tiles of the other side that may hold a visible pair and their indices, from the
    mask's tile map — computed on the device, no host sync. The plain causal mask needs none (the
    kernels bound their loops directly), nor does no mask."""
    if mask is None or mask.plain_causal:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return dummy, dummy, 0, False
    visible = mask.tile_map(PREFILL_BLOCK_M, PREFILL_BLOCK_N).to(device)
    if by_key:
        visible = visible.t()
    counts = visible.sum(-1, dtype=torch.int32)
    # A stable sort of "hidden" puts each row's visible tiles first, in order.
    order = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
    return counts.contiguous(), order, order.stride(0), True


def _prefill_forward(q, k, v, mask, scale, bias=None):
    from kvlab.attention.kernels.triton_kernels import flash_fwd_kernel

    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    m = _mask_args(mask, q.device, bias)
    counts, order, s_ti, use_list = _tile_lists(mask, q.device)
    grid = (math.ceil(Tq / PREFILL_BLOCK_M), B * Hq)
    flash_fwd_kernel[grid](q, k, v, out, lse, *m["tensors"], counts, order,
                           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
                           *m["strides"], s_ti, Hq, Hq // Hkv, Tq, Tk, scale, **m["flags"], USE_LIST=use_list,
                           BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, HEAD_DIM=D, UPCAST=_upcast(q))
    return out, lse


def _prefill_backward(do, q, k, v, out, lse, mask, scale, bias=None):
    from kvlab.attention.kernels.triton_kernels import (
        flash_bwd_dkdv_kernel,
        flash_bwd_dq_kernel,
        flash_bwd_preprocess_kernel,
    )

    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    delta = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    flash_bwd_preprocess_kernel[(math.ceil(Tq / PREFILL_BLOCK_M), B * Hq)](
        out, do, delta, *out.stride()[:3], *do.stride()[:3], Hq, Tq, BLOCK_M=PREFILL_BLOCK_M, HEAD_DIM=D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    m = _mask_args(mask, q.device, bias)
    common = (*m["strides"],)
    k_counts, k_order, s_k, use_list = _tile_lists(mask, q.device, by_key=True)
    flash_bwd_dkdv_kernel[(math.ceil(Tk / PREFILL_BLOCK_N), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, *m["tensors"], k_counts, k_order,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *lse.stride()[:2],
        *dk.stride()[:3], *dv.stride()[:3], *common, s_k, Hq, Hkv, G, Tq, Tk, scale, **m["flags"],
        USE_LIST=use_list, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, HEAD_DIM=D, UPCAST=_upcast(q))
    q_counts, q_order, s_q, _ = _tile_lists(mask, q.device)
    flash_bwd_dq_kernel[(math.ceil(Tq / PREFILL_BLOCK_M), B * Hq)](
        q, k, v, do, lse, delta, dq, *m["tensors"], q_counts, q_order,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *lse.stride()[:2], *dq.stride()[:3],
        *common, s_q, Hq, G, Tq, Tk, scale, **m["flags"], USE_LIST=use_list,
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, HEAD_DIM=D, UPCAST=_upcast(q))
    return dq, dk, dv


class TritonFlashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, bias):
        out, lse = _prefill_forward(q, k, v, mask, scale, bias)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.bias = mask, scale, bias
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _prefill_backward(dout.contiguous(), q, k, v, out, lse, ctx.mask, ctx.scale, ctx.bias)
        return dq, dk, dv, None, None, None


def triton_prefill(q, k, v, mask: AttentionMask | None = None, scale: float | None = None, *, return_lse=False,
                   bias=None):
    check_shapes(q, k, v)
    _check(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = TritonFlashFunction.apply(q, k, v, mask, scale, bias)
    return (out, lse) if return_lse else out


def decode_splits(lengths_max: int, batch_kv_programs: int, block_n: int = DECODE_BLOCK_N,
                  target_programs: int = 256) -> tuple[int, int]:
    """(number of splits, keys per split): enough programs to fill the GPU, splits a multiple of
    the key tile, at most one split per tile."""
    tiles = max(1, math.ceil(lengths_max / block_n))
    n_splits = max(1, min(tiles, math.ceil(target_programs / batch_kv_programs)))
    split_len = math.ceil(tiles / n_splits) * block_n
    return math.ceil(lengths_max / split_len) if lengths_max else 1, split_len


def triton_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                  scale: float | None = None, *, max_length: int | None = None) -> torch.Tensor:
    """One new query per row against a KV cache: ``q (B, Hq, 1, D)``, ``k, v (B, Hkv, S, D)``,
    ``lengths (B,)`` keys per row (slots ``[0, len)``). Each KV head is read once for its group."""
    import triton

    from kvlab.attention.kernels.triton_kernels import decode_combine_kernel, decode_split_kernel

    check_shapes(q, k, v)
    _check(q)
    B, Hq, Tq, D = q.shape
    if Tq != 1:
        raise ConfigError(f"triton_decode takes one query per row, got Tq={Tq}")
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    max_length = k.shape[2] if max_length is None else max_length
    n_splits, split_len = decode_splits(max_length, B * Hkv)
    block_g = max(16, triton.next_power_of_2(G)) if not interpreting() else triton.next_power_of_2(G)
    part_o = torch.empty(B * Hkv * n_splits * block_g, D, dtype=torch.float32, device=q.device)
    part_m = torch.empty(B * Hkv * n_splits * block_g, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    decode_split_kernel[(B * Hkv, n_splits)](q, k, v, lengths, part_o, part_m, part_l,
                                             q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
                                             Hkv, G, split_len, scale, BLOCK_G=block_g, BLOCK_N=DECODE_BLOCK_N,
                                             HEAD_DIM=D, UPCAST=_upcast(q))
    out = torch.empty_like(q)
    decode_combine_kernel[(B * Hkv,)](part_o, part_m, part_l, out, out.stride(0), out.stride(1), Hkv, G, n_splits,
                                      BLOCK_G=block_g, HEAD_DIM=D)
    return out


def triton_backend(q, k, v, mask, scale, bias=None):
    check_shapes(q, k, v)
    _check(q)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    reason = unsupported(q, k, v, mask, bias)
    if reason is not None:
        raise ConfigError(reason)
    if q.shape[2] == 1 and not needs_grad and bias is None:      # the split-K decode adds no bias
        lengths = prefix_lengths(mask, q.shape[0], k.shape[2])
        if lengths is not None:
            return triton_decode(q, k, v, lengths, scale)
    return triton_prefill(q, k, v, mask, scale, bias=bias)


def _auto_rank(q) -> int | None:
    # Chosen automatically only where it is fast: fp16/bf16 on an NVIDIA GPU.
    if q is not None and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        return 20
    return None


register_backend(Backend("triton", triton_backend, unsupported, auto_rank=_auto_rank))

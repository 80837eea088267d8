"""FlashAttention in plain PyTorch: tiled attention with an online softmax, and a backward pass
that recomputes each tile's probabilities from the saved log-sum-exp (FlashAttention-2).

Nothing of size ``Tq × Tk`` is ever allocated: the forward keeps, per query row, the running
maximum ``m``, the running denominator ``l`` and an unnormalized output accumulator while it
walks over key/value tiles; the backward walks the same tiles again. Training memory is therefore
linear in sequence length.

GQA/MQA natively: queries are viewed as ``(B, n_kv_head, group, Tq, D)`` and each query tile of a
KV head covers its whole group, so every K/V tile is read once for all the query heads sharing it.
Masks come as :class:`~kvlab.attention.masks.AttentionMask` (positions + validity + causal +
window + block-sparse layout) and are evaluated tile by tile; tiles that the mask's tile map
(:meth:`AttentionMask.tile_map`, one entry per tile) marks hidden are skipped without being looked
at, so the work grows with the visible tiles — a window's band, a sparse layout's blocks — not Tq×Tk. A score bias
(a tensor, sliced per tile, or a positional :class:`~kvlab.attention.bias.ScoreBias`, evaluated per
tile) is added to each tile's scores; a trainable bias (T5's buckets, a tensor that requires grad)
gets its gradient tile by tile in the backward too, through autograd on each recomputed bias tile
with that tile's dS — still nothing of size Tq × Tk. Values may be narrower or
wider than keys (``Dv != Dk``).

This is the readable reference of the algorithm that runs everywhere; the Triton kernels are the
fast GPU version of the same loops.
"""

from __future__ import annotations

import torch

from kvlab.attention.bias import bias_tile, grouped
from kvlab.attention.kernels.common import check_shapes, positional_bias_needs_mask
from kvlab.attention.masks import AttentionMask, may_attend
from kvlab.registry import Backend, register_backend

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128
# With few queries (decoding) a key tile costs G·Tq × block_k floats, so larger key tiles keep
# memory small and save the per-tile Python overhead that dominates such steps.
DECODE_MAX_QUERIES, DECODE_BLOCK_K = 16, 2048


def _tile_mask(mask: AttentionMask | None, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor | None:
    """``(B|1, 1, bq, bk)`` booleans for queries ``i0:i1`` and keys ``j0:j1``; None = all allowed."""
    if mask is None:
        return None
    return may_attend(mask.q_pos[:, i0:i1], mask.k_pos[:, j0:j1],
                      q_valid=None if mask.q_valid is None else mask.q_valid[:, i0:i1],
                      k_valid=None if mask.k_valid is None else mask.k_valid[:, j0:j1],
                      causal=mask.causal, window=mask.window, sinks=mask.sinks,
                      q_seg=None if mask.q_seg is None else mask.q_seg[:, i0:i1],
                      k_seg=None if mask.k_seg is None else mask.k_seg[:, j0:j1], sparse=mask.sparse,
                      k_exempt=None if mask.k_exempt is None else mask.k_exempt[:, j0:j1])


def _visible_tiles(mask: AttentionMask | None, block_q: int, block_k: int) -> list[list[bool]] | None:
    """Which (query tile, key tile) pairs may hold a visible pair; None = all of them."""
    if mask is None:
        return None
    return mask.tile_map(block_q, block_k).tolist()


def _grouped(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    B, Hq, T, D = q.shape
    return q.view(B, n_kv, Hq // n_kv, T, D)


def _add_bias(s: torch.Tensor, bias, mask, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    """Scores ``(B, Hkv, G·bq, bk)`` plus the bias tile (viewed per KV head and group)."""
    b = bias_tile(bias, mask, i0, i1, j0, j1)
    if b is None:
        return s
    B, Hkv, rows, bk = s.shape
    return (s.view(B, Hkv, -1, i1 - i0, bk) + grouped(b.to(s.dtype), Hkv)).view(B, Hkv, rows, bk)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None, scale: float,
                  block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                  bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``(B, Hq, Tq, Dv)`` (q's dtype) and log-sum-exp ``(B, Hq, Tq)`` (fp32, -inf for rows
    that attend to nothing, whose output is 0)."""
    check_shapes(q, k, v)
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = _grouped(q, Hkv)
    out = torch.empty(B, Hkv, G, Tq, Dv, dtype=acc_dtype, device=q.device)
    lse = torch.empty(B, Hkv, G, Tq, dtype=acc_dtype, device=q.device)
    neg_inf = float("-inf")
    visible = _visible_tiles(mask, block_q, block_k)
    for i0 in range(0, Tq, block_q):
        i1 = min(i0 + block_q, Tq)
        bq = i1 - i0
        qt = qg[:, :, :, i0:i1].to(acc_dtype).reshape(B, Hkv, G * bq, D) * scale
        m = torch.full((B, Hkv, G * bq), neg_inf, dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, Hkv, G * bq, Dv, dtype=acc_dtype, device=q.device)
        for j0 in range(0, Tk, block_k):
            if visible is not None and not visible[i0 // block_q][j0 // block_k]:
                continue
            j1 = min(j0 + block_k, Tk)
            tile = _tile_mask(mask, i0, i1, j0, j1)
            s = qt @ k[:, :, j0:j1].to(acc_dtype).transpose(-1, -2)            # (B, Hkv, G·bq, bk)
            s = _add_bias(s, bias, mask, i0, i1, j0, j1)
            if tile is not None:
                s = s.view(B, Hkv, G, bq, j1 - j0).masked_fill(~tile.unsqueeze(2), neg_inf).view_as(s)
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(m_new == neg_inf, 0.0, m_new)                 # rows with nothing yet
            p = torch.exp(s - m_safe.unsqueeze(-1))
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1) + p @ v[:, :, j0:j1].to(acc_dtype)
            m = m_new
        empty = l == 0
        out[:, :, :, i0:i1] = (acc / torch.where(empty, 1.0, l).unsqueeze(-1)).view(B, Hkv, G, bq, Dv)
        lse[:, :, :, i0:i1] = torch.where(empty, neg_inf, m + torch.log(l)).view(B, Hkv, G, bq)
    return out.view(B, Hq, Tq, Dv).to(q.dtype), lse.view(B, Hq, Tq)


def _trainable(bias) -> list[torch.Tensor]:
    """The tensors a bias's gradient flows to: a tensor bias itself, a ScoreBias's parameters."""
    if bias is None:
        return []
    if isinstance(bias, torch.Tensor):
        return [bias] if bias.requires_grad else []
    return [p for p in bias.parameters() if p.requires_grad]


def _sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the dimensions its tensor was broadcast along."""
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


def flash_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, mask: AttentionMask | None, scale: float,
                   block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K, bias=None):
    """Gradients of q, k, v (and of a trainable bias's tensors, :func:`_trainable`), recomputing P
    tile by tile from the log-sum-exp (FlashAttention-2).

    dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = dS K·scale, dK = dSᵀ Q·scale,
    dBias = dS. With grouped queries the products over ``G·bq`` rows sum each KV head's gradient
    over its group.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg, dog = _grouped(q, Hkv), _grouped(do, Hkv)
    lse_g = lse.view(B, Hkv, G, Tq)
    delta = (do.to(acc_dtype) * out.to(acc_dtype)).sum(-1).view(B, Hkv, G, Tq)      # rowsum(dO ∘ O)
    dq = torch.zeros(B, Hkv, G, Tq, D, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(B, Hkv, Tk, D, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(B, Hkv, Tk, v.shape[-1], dtype=acc_dtype, device=q.device)
    visible = _visible_tiles(mask, block_q, block_k)
    trainable = _trainable(bias)
    d_bias = [torch.zeros_like(t) for t in trainable]
    for j0 in range(0, Tk, block_k):
        j1 = min(j0 + block_k, Tk)
        kt, vt = k[:, :, j0:j1].to(acc_dtype), v[:, :, j0:j1].to(acc_dtype)
        for i0 in range(0, Tq, block_q):
            i1 = min(i0 + block_q, Tq)
            bq = i1 - i0
            if visible is not None and not visible[i0 // block_q][j0 // block_k]:
                continue
            tile = _tile_mask(mask, i0, i1, j0, j1)
            qt = qg[:, :, :, i0:i1].to(acc_dtype).reshape(B, Hkv, G * bq, D)
            dot = dog[:, :, :, i0:i1].to(acc_dtype).reshape(B, Hkv, G * bq, -1)
            row_lse = lse_g[:, :, :, i0:i1].reshape(B, Hkv, G * bq, 1)
            s = _add_bias((qt @ kt.transpose(-1, -2)) * scale, bias, mask, i0, i1, j0, j1)
            p = torch.exp(s - torch.where(row_lse == float("-inf"), float("inf"), row_lse))  # empty rows -> 0
            if tile is not None:
                p = p.view(B, Hkv, G, bq, j1 - j0).masked_fill(~tile.unsqueeze(2), 0.0).view_as(p)
            dv[:, :, j0:j1] += p.transpose(-1, -2) @ dot
            dp = dot @ vt.transpose(-1, -2)
            ds = p * (dp - delta[:, :, :, i0:i1].reshape(B, Hkv, G * bq, 1))
            dq[:, :, :, i0:i1] += (ds @ kt).view(B, Hkv, G, bq, D) * scale
            dk[:, :, j0:j1] += (ds.transpose(-1, -2) @ qt) * scale
            if trainable:
                with torch.enable_grad():
                    tile_bias = bias_tile(bias, mask, i0, i1, j0, j1)
                    g = _sum_to(ds.view(B, Hq, bq, j1 - j0), tile_bias.shape).to(tile_bias.dtype)
                    for acc, got in zip(d_bias, torch.autograd.grad(tile_bias, trainable, g, allow_unused=True)):
                        if got is not None:
                            acc += got
    return dq.view(B, Hq, Tq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_bias


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, the output and the log-sum-exp — O(T) beyond the inputs — never P."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, block_q, block_k, bias, *trainable):
        # ``trainable`` (the bias's tensors that want a gradient) are inputs only so that autograd
        # routes their gradients through backward.
        out, lse = flash_forward(q, k, v, mask, scale, block_q, block_k, bias)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.blocks, ctx.bias = mask, scale, (block_q, block_k), bias
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, d_bias = flash_backward(dout.contiguous(), q, k, v, out, lse, ctx.mask, ctx.scale, *ctx.blocks,
                                            bias=ctx.bias)
        return (dq, dk, dv, None, None, None, None, None, *d_bias)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None = None,
                    scale: float | None = None, *, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                    return_lse: bool = False, bias=None):
    """Tiled attention with a recomputing backward; tile sizes are parameters."""
    if block_q < 1 or block_k < 1:
        from kvlab.errors import ConfigError

        raise ConfigError(f"tile sizes must be positive, got block_q={block_q}, block_k={block_k}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    trainable = _trainable(bias) if torch.is_grad_enabled() else []
    out, lse = FlashAttentionFunction.apply(q, k, v, mask, scale, block_q, block_k, bias, *trainable)
    return (out, lse) if return_lse else out


def flash_backend(q, k, v, mask, scale, bias=None):
    block_k = DECODE_BLOCK_K if q.shape[2] <= DECODE_MAX_QUERIES else DEFAULT_BLOCK_K
    return flash_attention(q, k, v, mask, scale, block_k=block_k, bias=bias)


def _supports(q, k, v, mask, bias) -> str | None:
    return positional_bias_needs_mask(mask, bias)


register_backend(Backend("flash", flash_backend, _supports))

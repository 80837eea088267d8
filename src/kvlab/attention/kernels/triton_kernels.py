"""Triton kernels: FlashAttention-2 prefill forward/backward and split-KV decode (Flash-Decoding).

Layouts: q ``(B, Hq, Tq, D)``, k/v ``(B, Hkv, Tk, D)`` with arbitrary strides; query head ``h``
reads KV head ``h // G``. Masks are the structured rule of :mod:`kvlab.attention.masks`: per row
query/key positions and validity, causal, sliding window with sinks, a block-sparse layout; evaluated
per tile from int32 vectors. With a tile list (USE_LIST: the host's tile map of the mask, as
FlexAttention's block mask) each program visits only the tiles that may hold a visible pair.
Accumulation is fp32 whatever the input dtype. These kernels run on NVIDIA GPUs and, for tests,
on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (set only under TRITON_INTERPRET for bf16 inputs)
    multiplies in fp32, because Triton 3.9's interpreter computes bf16 dots wrongly."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b).to(tl.float32)


@triton.jit
def _load_tile(ptr, b, h, sb, sh, st, rows, cols, n_rows):
    """Rows ``rows`` of the (T, D) matrix of batch ``b``, head ``h``; zeros for rows >= n_rows."""
    return tl.load(ptr + b * sb + h * sh + rows[:, None] * st + cols[None, :], mask=rows[:, None] < n_rows, other=0.0)


@triton.jit
def _tile_allowed(qp_ptr, qv_ptr, kp_ptr, kv_ptr, b, offs_m, offs_n, Tq, Tk,
                  s_qp, s_qv, s_kp, s_kv, HAS_MASK: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, SP_BLOCK: tl.constexpr,
                  SP_LOCAL: tl.constexpr, SP_GLOBAL: tl.constexpr, SP_STRIDE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) booleans: in range, valid, causal, inside the window (or a sink) and in a
    block the sparse layout shows (SP_BLOCK > 0)."""
    ok = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if HAS_MASK:
        qp = tl.load(qp_ptr + b * s_qp + offs_m, mask=offs_m < Tq, other=0)
        kp = tl.load(kp_ptr + b * s_kp + offs_n, mask=offs_n < Tk, other=0)
        if CAUSAL:
            ok = ok & (kp[None, :] <= qp[:, None])
        if WINDOW > 0:
            in_window = (qp[:, None] - kp[None, :]) < WINDOW
            if SINKS > 0:
                in_window = in_window | (kp[None, :] < SINKS)
            ok = ok & in_window
        if SP_BLOCK > 0:
            d = qp[:, None] // SP_BLOCK - kp[None, :] // SP_BLOCK
            shown = (d < SP_LOCAL) | ((kp[None, :] // SP_BLOCK) < SP_GLOBAL)
            if SP_STRIDE > 0:
                shown = shown | (d % SP_STRIDE == 0)
            ok = ok & shown & (d >= 0)
        if HAS_QV:
            qv = tl.load(qv_ptr + b * s_qv + offs_m, mask=offs_m < Tq, other=0)
            ok = ok & (qv[:, None] != 0)
        if HAS_KV:
            kv = tl.load(kv_ptr + b * s_kv + offs_n, mask=offs_n < Tk, other=0)
            ok = ok & (kv[None, :] != 0)
    return ok


@triton.jit
def _alibi_tile(qp_ptr, kp_ptr, sl_ptr, b, h, offs_m, offs_n, Tq, Tk, s_qp, s_kp):
    """ALiBi's (BLOCK_M, BLOCK_N) bias for head h: slope_h · (k_pos − q_pos), from the positions."""
    qp = tl.load(qp_ptr + b * s_qp + offs_m, mask=offs_m < Tq, other=0)
    kp = tl.load(kp_ptr + b * s_kp + offs_n, mask=offs_n < Tk, other=0)
    return tl.load(sl_ptr + h) * (kp[None, :] - qp[:, None]).to(tl.float32)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, QP, QV, KP, KV, SL, b, h, hk, offs_m, offs_d, start_n,
              skb, skh, skt, svb, svh, svt, s_qp, s_qv, s_kp, s_kv, Tq, Tk, qk_scale,
              HAS_MASK: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, SINKS: tl.constexpr, SP_BLOCK: tl.constexpr, SP_LOCAL: tl.constexpr,
              SP_GLOBAL: tl.constexpr, SP_STRIDE: tl.constexpr, ALIBI: tl.constexpr,
              BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of the forward's online softmax (base 2)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K, b, hk, skb, skh, skt, offs_n, offs_d, Tk)
    v = _load_tile(V, b, hk, svb, svh, svt, offs_n, offs_d, Tk)
    s = _dot(q, tl.trans(k), UPCAST) * qk_scale
    if ALIBI:                                  # in base 2 like the scores
        s += _alibi_tile(QP, KP, SL, b, h, offs_m, offs_n, Tq, Tk, s_qp, s_kp) * 1.4426950408889634
    ok = _tile_allowed(QP, QV, KP, KV, b, offs_m, offs_n, Tq, Tk, s_qp, s_qv, s_kp, s_kv,
                       HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL, SP_GLOBAL, SP_STRIDE)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return acc, l_i, m_new


@triton.jit
def flash_fwd_kernel(Q, K, V, O, LSE, QP, QV, KP, KV, SL, TC, TI,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh,
                     s_qp, s_qv, s_kp, s_kv, s_ti, Hq, G, Tq, Tk, scale,
                     HAS_MASK: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, CAUSAL: tl.constexpr,
                     PLAIN_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, SP_BLOCK: tl.constexpr,
                     SP_LOCAL: tl.constexpr, SP_GLOBAL: tl.constexpr, SP_STRIDE: tl.constexpr, ALIBI: tl.constexpr,
                     USE_LIST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     UPCAST: tl.constexpr):
    """TC/TI (USE_LIST): per query tile, the number of key tiles to visit and their indices."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, Tq)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634          # work in base 2: exp(x) = exp2(x·log2 e)
    if USE_LIST:
        for t in range(0, tl.load(TC + pid_m)):
            start_n = tl.load(TI + pid_m * s_ti + t) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, QP, QV, KP, KV, SL, b, h, hk, offs_m, offs_d, start_n,
                                      skb, skh, skt, svb, svh, svt, s_qp, s_qv, s_kp, s_kv, Tq, Tk, qk_scale,
                                      HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL, SP_GLOBAL,
                                      SP_STRIDE, ALIBI, BLOCK_N, UPCAST)
    else:
        hi = Tk
        if PLAIN_CAUSAL:                           # positions are 0..T-1: later tiles are all masked
            hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, QP, QV, KP, KV, SL, b, h, hk, offs_m, offs_d, start_n,
                                      skb, skh, skt, svb, svh, svt, s_qp, s_qv, s_kp, s_kv, Tq, Tk, qk_scale,
                                      HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL, SP_GLOBAL,
                                      SP_STRIDE, ALIBI, BLOCK_N, UPCAST)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < Tq)
    # LSE in natural log; -inf for rows with nothing to attend to.
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def flash_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, Hq, Tq,
                                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO ∘ O), fp32, laid out (B, Hq, Tq) contiguous."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_tile(O, b, h, sob, soh, sot, offs_m, offs_d, Tq).to(tl.float32)
    do = _load_tile(DO, b, h, sdb, sdh, sdt, offs_m, offs_d, Tq).to(tl.float32)
    tl.store(DELTA + bh * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _bwd_probs(q, k, QP, QV, KP, KV, SL, LSE, slb, slh, b, h, offs_m, offs_n, Tq, Tk, s_qp, s_qv, s_kp, s_kv, scale,
               HAS_MASK: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, SINKS: tl.constexpr, SP_BLOCK: tl.constexpr, SP_LOCAL: tl.constexpr,
               SP_GLOBAL: tl.constexpr, SP_STRIDE: tl.constexpr, ALIBI: tl.constexpr, UPCAST: tl.constexpr):
    """P of one (query tile, key tile), recomputed from the saved log-sum-exp; 0 where masked."""
    lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=offs_m < Tq, other=float("-inf"))
    s = _dot(q, tl.trans(k), UPCAST) * scale
    if ALIBI:
        s += _alibi_tile(QP, KP, SL, b, h, offs_m, offs_n, Tq, Tk, s_qp, s_kp)
    ok = _tile_allowed(QP, QV, KP, KV, b, offs_m, offs_n, Tq, Tk, s_qp, s_qv, s_kp, s_kv,
                       HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL, SP_GLOBAL, SP_STRIDE)
    ok = ok & (lse[:, None] != float("-inf"))
    return tl.where(ok, tl.exp(s - tl.where(ok, lse[:, None], 0.0)), 0.0)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, QP, QV, KP, KV, SL, b, h, Hq, offs_n, offs_d, start_m,
               sqb, sqh, sqt, sdb, sdh, sdt, slb, slh, s_qp, s_qv, s_kp, s_kv, Tq, Tk, scale,
               HAS_MASK: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, SINKS: tl.constexpr, SP_BLOCK: tl.constexpr, SP_LOCAL: tl.constexpr,
               SP_GLOBAL: tl.constexpr, SP_STRIDE: tl.constexpr, ALIBI: tl.constexpr,
               BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, Tq)
    do = _load_tile(DO, b, h, sdb, sdh, sdt, offs_m, offs_d, Tq)
    delta = tl.load(DELTA + (b * Hq + h) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    p = _bwd_probs(q, k, QP, QV, KP, KV, SL, LSE, slb, slh, b, h, offs_m, offs_n, Tq, Tk, s_qp, s_qv, s_kp, s_kv,
                   scale, HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL, SP_GLOBAL, SP_STRIDE,
                   ALIBI, UPCAST)
    dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST)
    dp = _dot(do, tl.trans(v), UPCAST)
    ds = p * (dp - delta[:, None])
    dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST)
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, QP, QV, KP, KV, SL, TC, TI,
                          sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, slb, slh,
                          sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                          s_qp, s_qv, s_kp, s_kv, s_ti, Hq, Hkv, G, Tq, Tk, scale,
                          HAS_MASK: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, CAUSAL: tl.constexpr,
                          PLAIN_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr,
                          SP_BLOCK: tl.constexpr, SP_LOCAL: tl.constexpr, SP_GLOBAL: tl.constexpr,
                          SP_STRIDE: tl.constexpr, ALIBI: tl.constexpr, USE_LIST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (key tile, b, KV head): loops over the G query heads of the group and
    every query tile (USE_LIST: the query tiles TC/TI name for this key tile), so each KV head's
    gradient is summed over its group without atomics."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b, hk = bhk // Hkv, bhk % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_tile(K, b, hk, skb, skh, skt, offs_n, offs_d, Tk)
    v = _load_tile(V, b, hk, svb, svh, svt, offs_n, offs_d, Tk)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        if USE_LIST:
            for t in range(0, tl.load(TC + pid_n)):
                start_m = tl.load(TI + pid_n * s_ti + t) * BLOCK_M
                dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, QP, QV, KP, KV, SL, b, h, Hq, offs_n, offs_d,
                                    start_m, sqb, sqh, sqt, sdb, sdh, sdt, slb, slh, s_qp, s_qv, s_kp, s_kv, Tq, Tk,
                                    scale, HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL,
                                    SP_GLOBAL, SP_STRIDE, ALIBI, BLOCK_M, UPCAST)
        else:
            lo = 0
            if PLAIN_CAUSAL:
                lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
            for start_m in range(lo, Tq, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, QP, QV, KP, KV, SL, b, h, Hq, offs_n, offs_d,
                                    start_m, sqb, sqh, sqt, sdb, sdh, sdt, slb, slh, s_qp, s_qv, s_kp, s_kv, Tq, Tk,
                                    scale, HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL,
                                    SP_GLOBAL, SP_STRIDE, ALIBI, BLOCK_M, UPCAST)
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=offs_n[:, None] < Tk)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=offs_n[:, None] < Tk)


@triton.jit
def _dq_tile(dq, q, do, delta, K, V, QP, QV, KP, KV, SL, LSE, slb, slh, b, h, hk, offs_m, offs_d, start_n,
             skb, skh, skt, svb, svh, svt, s_qp, s_qv, s_kp, s_kv, Tq, Tk, scale,
             HAS_MASK: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, SINKS: tl.constexpr, SP_BLOCK: tl.constexpr, SP_LOCAL: tl.constexpr,
             SP_GLOBAL: tl.constexpr, SP_STRIDE: tl.constexpr, ALIBI: tl.constexpr,
             BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K, b, hk, skb, skh, skt, offs_n, offs_d, Tk)
    v = _load_tile(V, b, hk, svb, svh, svt, offs_n, offs_d, Tk)
    p = _bwd_probs(q, k, QP, QV, KP, KV, SL, LSE, slb, slh, b, h, offs_m, offs_n, Tq, Tk, s_qp, s_qv, s_kp, s_kv,
                   scale, HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL, SP_GLOBAL, SP_STRIDE,
                   ALIBI, UPCAST)
    dp = _dot(do, tl.trans(v), UPCAST)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, UPCAST)


@triton.jit
def flash_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, QP, QV, KP, KV, SL, TC, TI,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, slb, slh, sdqb, sdqh, sdqt,
                        s_qp, s_qv, s_kp, s_kv, s_ti, Hq, G, Tq, Tk, scale,
                        HAS_MASK: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, CAUSAL: tl.constexpr,
                        PLAIN_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, SP_BLOCK: tl.constexpr,
                        SP_LOCAL: tl.constexpr, SP_GLOBAL: tl.constexpr, SP_STRIDE: tl.constexpr,
                        ALIBI: tl.constexpr, USE_LIST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, Tq)
    do = _load_tile(DO, b, h, sdb, sdh, sdt, offs_m, offs_d, Tq)
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if USE_LIST:
        for t in range(0, tl.load(TC + pid_m)):
            start_n = tl.load(TI + pid_m * s_ti + t) * BLOCK_N
            dq = _dq_tile(dq, q, do, delta, K, V, QP, QV, KP, KV, SL, LSE, slb, slh, b, h, hk, offs_m, offs_d,
                          start_n, skb, skh, skt, svb, svh, svt, s_qp, s_qv, s_kp, s_kv, Tq, Tk, scale,
                          HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL, SP_GLOBAL, SP_STRIDE,
                          ALIBI, BLOCK_N, UPCAST)
    else:
        hi = Tk
        if PLAIN_CAUSAL:
            hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, delta, K, V, QP, QV, KP, KV, SL, LSE, slb, slh, b, h, hk, offs_m, offs_d,
                          start_n, skb, skh, skt, svb, svh, svt, s_qp, s_qv, s_kp, s_kv, Tq, Tk, scale,
                          HAS_MASK, HAS_QV, HAS_KV, CAUSAL, WINDOW, SINKS, SP_BLOCK, SP_LOCAL, SP_GLOBAL, SP_STRIDE,
                          ALIBI, BLOCK_N, UPCAST)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=offs_m[:, None] < Tq)


@triton.jit
def decode_split_kernel(Q, K, V, LENS, PO, PM, PL,
                        sqb, sqh, skb, skh, skt, svb, svh, svt, Hkv, G, split_len, scale,
                        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Flash-Decoding, phase 1. One program per (b, KV head, split): the G query heads of the
    group form one (BLOCK_G, D) tile, so each K/V tile of the split is read once for all of them.
    Writes the split's unnormalized output, row maximum and denominator (base 2)."""
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b, hk = bhk // Hkv, bhk % Hkv
    length = tl.load(LENS + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + (hk * G + offs_g)[:, None] * sqh + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n < hi
        k = _load_tile(K, b, hk, skb, skh, skt, offs_n, offs_d, hi)
        v = _load_tile(V, b, hk, svb, svh, svt, offs_n, offs_d, hi)
        s = _dot(q, tl.trans(k), UPCAST) * qk_scale
        s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    row = (bhk * n_splits + split) * BLOCK_G + offs_g
    tl.store(PO + row[:, None] * HEAD_DIM + offs_d[None, :], acc)
    tl.store(PM + row, m_i)
    tl.store(PL + row, l_i)


@triton.jit
def decode_combine_kernel(PO, PM, PL, O, sob, soh, Hkv, G, n_splits,
                          BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Flash-Decoding, phase 2: merge the splits of one (b, KV head) with their maxima."""
    bhk = tl.program_id(0)
    b, hk = bhk // Hkv, bhk % Hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(PM + (bhk * n_splits + s) * BLOCK_G + offs_g))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for s in range(0, n_splits):
        row = (bhk * n_splits + s) * BLOCK_G + offs_g
        w = tl.exp2(tl.load(PM + row) - m_safe)
        l += w * tl.load(PL + row)
        acc += w[:, None] * tl.load(PO + row[:, None] * HEAD_DIM + offs_d[None, :])
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(O + b * sob + (hk * G + offs_g)[:, None] * soh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_g[:, None] < G)

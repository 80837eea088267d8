"""An independent float64 implementation of a kvlab model, for tests.

Written from the definitions, one sequence and one head at a time, with no code shared with
kvlab: RoPE pair by pair, query head h reading KV head h // group, CLA consumers reading the
K/V of the layer named by kv_source, causal + sliding-window masks from positions. MLA layers
(DeepSeek-V2/V3's definition, expanded): latent = kv_a_proj's first kv_lora_rank outputs, RMS-normed;
per head, key = [kv_b_proj's nope rows · latent ; the shared RoPE key], value = its value rows · latent.
lowrank layers (Palu): keys k_up·k_down·h then rotated, values v_up·v_down·h.
"""

from __future__ import annotations

import math

import torch


def _norm(cfg, P, prefix, x):
    if cfg.norm == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * P[prefix + ".weight"]
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + cfg.norm_eps) * P[prefix + ".weight"] + P[prefix + ".bias"]


def _rope(x, positions, theta):
    """x (n, H, D): rotate dimension pairs (j, j + D/2) by angle pos * theta^(-2j/D)."""
    n, H, D = x.shape
    out = x.clone()
    for j in range(D // 2):
        freq = theta ** (-2.0 * j / D)
        ang = positions.double() * freq
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        a, b = x[:, :, j], x[:, :, j + D // 2]
        out[:, :, j] = a * c - b * s
        out[:, :, j + D // 2] = b * c + a * s
    return out


def _linear(P, name, x):
    y = x @ P[name + ".weight"].T
    if name + ".bias" in P:
        y = y + P[name + ".bias"]
    return y


def _mla_qkv(cfg, P, pre, h, pos, kv, i, src):
    """Per-head queries, keys and values (n, H, ·) of an MLA layer, expanded from the latent."""
    n, H = h.shape[0], cfg.n_head
    o = cfg.layer_options(i)
    nope, R, dv, rank = o["qk_nope_head_dim"], o["qk_rope_head_dim"], o["v_head_dim"], o["kv_lora_rank"]
    if o["q_lora_rank"] is None:
        q = _linear(P, pre + ".q_proj", h)
    else:
        a = _linear(P, pre + ".q_a_proj", h)
        a = a / torch.sqrt((a * a).mean(-1, keepdim=True) + cfg.norm_eps) * P[pre + ".q_a_layernorm.weight"]
        q = _linear(P, pre + ".q_b_proj", a)
    q = q.view(n, H, nope + R)
    q = torch.cat([q[..., :nope], _rope(q[..., nope:], pos, cfg.rope_theta)], -1)
    if src == i:
        ckr = _linear(P, pre + ".kv_a_proj_with_mqa", h)
        c, k_rope = ckr[:, :rank], ckr[:, rank:]
        if o["latent_norm"]:
            c = c / torch.sqrt((c * c).mean(-1, keepdim=True) + cfg.norm_eps) * P[pre + ".kv_a_layernorm.weight"]
        kv[i] = (c, _rope(k_rope.view(n, 1, R), pos, cfg.rope_theta)[:, 0])
    c, k_rope = kv[src]
    up = (c @ P[pre + ".kv_b_proj.weight"].T).view(n, H, nope + dv)
    k = torch.cat([up[..., :nope], k_rope[:, None, :].expand(n, H, R)], -1)
    return q, k, up[..., nope:]


def _alibi_slope(h: int, n: int) -> float:
    """Head h's ALiBi slope, from the paper's definition: 2^(-8(h+1)/n) for a power-of-two n; else
    the m = 2^floor(log2 n) slopes of m heads, then the odd-indexed exponents of 2m heads."""
    m = 1 << (n.bit_length() - 1)
    if h < m:
        return 2.0 ** (-8.0 * (h + 1) / m)
    return 2.0 ** (-8.0 * (2 * (h - m) + 1) / (2 * m))


def _t5_bucket(distance: int, buckets: int, max_distance: int) -> int:
    """T5's decoder bucket of a distance q - k >= 0 (Raffel et al. §2.1): exact below buckets/2,
    then log-spaced up to max_distance, then the last bucket."""
    exact = buckets // 2
    if distance < exact:
        return distance
    return min(buckets - 1, exact + int(math.log(distance / exact) / math.log(max_distance / exact)
                                        * (buckets - exact)))


def _sparse_allowed(spec: dict, qp: int, kp: int) -> bool:
    """A block-sparse layout's rule for one causal pair, from its definition."""
    qb, kb = qp // spec["block"], kp // spec["block"]
    stride = spec.get("stride", 0)
    return (qb - kb < spec.get("local", 1) or kb < spec.get("global", 0)
            or (stride > 0 and (qb - kb) % stride == 0))


def _compressed_attention(cfg, q, k, v, i):
    """Memory compression from its definition, query by query: the keys of the last `window`
    positions, plus the mean key/value of every complete block of `block` positions whose first
    position is at least `window` back."""
    W, C = (cfg.layer_specs[i].options[o] for o in ("window", "block"))
    n, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(n, Hq, D, dtype=torch.float64)
    for t in range(n):
        for hq in range(Hq):
            hk = hq // group
            keys = [k[j, hk] for j in range(max(0, t - W + 1), t + 1)]
            vals = [v[j, hk] for j in range(max(0, t - W + 1), t + 1)]
            for b in range(n // C):
                if b * C + W <= t:
                    keys.append(k[b * C:(b + 1) * C, hk].mean(0))
                    vals.append(v[b * C:(b + 1) * C, hk].mean(0))
            p = torch.softmax(torch.stack(keys) @ q[t, hq] / math.sqrt(D), 0)
            out[t, hq] = p @ torch.stack(vals)
    return out.reshape(n, Hq * D)


def _block_rest(cfg, P, pre, x, h, attn):
    """The residual and the MLP of a block, after its attention output ``attn``."""
    if cfg.block == "parallel":
        mlp_in = h
    else:
        x = x + attn
        mlp_in = _norm(cfg, P, pre + ".post_attention_layernorm", x)
    m = _mlp(cfg, P, pre, mlp_in)
    return x + attn + m if cfg.block == "parallel" else x + m


def _mlp(cfg, P, pre, mlp_in):
    """The block's MLP from each kind's definition."""
    if cfg.mlp == "swiglu":
        g = _linear(P, pre + ".mlp.gate_proj", mlp_in)
        m = _linear(P, pre + ".mlp.down_proj", g * torch.sigmoid(g) * _linear(P, pre + ".mlp.up_proj", mlp_in))
    elif cfg.mlp == "geglu":      # T5 v1.1: tanh-approximated GELU of the gate
        g = _linear(P, pre + ".mlp.gate_proj", mlp_in)
        gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        m = _linear(P, pre + ".mlp.down_proj", gelu * _linear(P, pre + ".mlp.up_proj", mlp_in))
    elif cfg.mlp == "relu":
        m = _linear(P, pre + ".mlp.down_proj", _linear(P, pre + ".mlp.up_proj", mlp_in).clamp_min(0))
    else:
        u = _linear(P, pre + ".mlp.up_proj", mlp_in)
        m = _linear(P, pre + ".mlp.down_proj", 0.5 * u * (1 + torch.erf(u / math.sqrt(2))))
    return m


def _linear_attention(cfg, P, pre, h, i):
    """Linear attention token by token (the recurrent definition): per KV head a state
    S = γ S + φ(k) vᵀ, z = γ z + φ(k); output φ(q)·S / (φ(q)·z + 1e-6); φ = elu + 1 or Hedgehog's
    [softmax(xW), softmax(−xW)]; γ_j = 1 − 2^(−5−j) with the RetNet decay, else 1."""
    opts = cfg.layer_specs[i].options
    n, Hq, Hkv, D = h.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q = _linear(P, pre + ".q_proj", h).view(n, Hq, D)
    k = _linear(P, pre + ".k_proj", h).view(n, Hkv, D)
    v = _linear(P, pre + ".v_proj", h).view(n, Hkv, D)

    def phi(x, head, which):
        if opts.get("feature", "elu") == "elu":
            return torch.where(x > 0, x + 1, torch.exp(x))
        y = x @ P[f"{pre}.feature_{which}"][head]
        return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)])

    out = torch.zeros(n, Hq, D, dtype=torch.float64)
    for hk in range(Hkv):
        gamma = 1 - 2.0 ** (-5 - hk) if opts.get("decay", "none") == "retnet" else 1.0
        S, z = 0.0, 0.0
        for t in range(n):
            fk = phi(k[t, hk], hk, "k")
            S = gamma * S + torch.outer(fk, v[t, hk])
            z = gamma * z + fk
            for hq in range(hk * (Hq // Hkv), (hk + 1) * (Hq // Hkv)):
                fq = phi(q[t, hq], hq, "q")
                out[t, hq] = (fq @ S) / (fq @ z + 1e-6)
    return out.reshape(n, Hq * D)


def naive_sequence_logits(model, seq: torch.Tensor) -> torch.Tensor:
    """Logits (n, vocab) in float64 for one unpadded sequence of token ids."""
    cfg = model.cfg
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    n = len(seq)
    pos = torch.arange(n)
    x = P["embed_tokens.weight"][seq]
    if cfg.pos == "learned":
        x = x + P["embed_positions.weight"][pos]
    Hq, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    kv = {}
    for i in range(cfg.n_layer):
        pre = f"layers.{i}"
        h = _norm(cfg, P, pre + ".input_layernorm", x)
        src = cfg.kv_sources[i]
        if cfg.layer_specs[i].kind == "linear":
            attn = _linear(P, pre + ".self_attn.o_proj", _linear_attention(cfg, P, pre + ".self_attn", h, i))
            x = _block_rest(cfg, P, pre, x, h, attn)
            continue
        if cfg.layer_specs[i].kind == "mla":
            q, k, v = _mla_qkv(cfg, P, pre + ".self_attn", h, pos, kv, i, src)
            group, Dq = 1, q.shape[-1]          # expanded: one key and value per query head
        else:
            q = _linear(P, pre + ".self_attn.q_proj", h).view(n, Hq, D)
            if src == i and cfg.layer_specs[i].kind == "lowrank":
                # Palu: latents k_down·h and v_down·h, rebuilt by k_up/v_up, keys then rotated
                k = _linear(P, pre + ".self_attn.k_up", _linear(P, pre + ".self_attn.k_down", h)).view(n, Hkv, D)
                v = _linear(P, pre + ".self_attn.v_up", _linear(P, pre + ".self_attn.v_down", h)).view(n, Hkv, D)
            elif src == i:
                k = _linear(P, pre + ".self_attn.k_proj", h).view(n, Hkv, D)
                v = _linear(P, pre + ".self_attn.v_proj", h).view(n, Hkv, D)
            if src == i:
                if cfg.pos == "rope":
                    k = _rope(k, pos, cfg.rope_theta)
                kv[i] = (k, v)
            k, v = kv[src]
            q_unrotated = q
            if cfg.pos == "rope":
                q = _rope(q, pos, cfg.rope_theta)
            group, Dq = Hq // Hkv, D
        if cfg.layer_specs[i].kind == "compressed":
            attn = _linear(P, pre + ".self_attn.o_proj", _compressed_attention(cfg, q, k, v, i))
            x = _block_rest(cfg, P, pre, x, h, attn)
            continue
        heads = []
        for hq in range(Hq):
            hk = hq // group
            scale = cfg.attn_scale if cfg.attn_scale is not None else 1 / math.sqrt(Dq)
            scores = (q[:, hq] @ k[:, hk].T) * scale
            allowed = pos[None, :] <= pos[:, None]
            window = cfg.layer_window(i)          # the layer's own window, else the model's
            if window is not None:
                # ... except the first `sinks` positions, which a windowed layer always sees (StreamingLLM)
                sinks = cfg.layer_specs[i].options.get("sinks", cfg.attention_sinks)
                allowed &= ((pos[:, None] - pos[None, :]) < window) | (pos[None, :] < sinks)
                if sinks and cfg.sink_positions == "cache":
                    # StreamingLLM: the cache holds the sinks, then the window, the query last, and
                    # each token's position is its index there: sink j is seen from min(i, S+W-1).
                    q_at = _rope(q_unrotated, pos.clamp(max=sinks + window - 1), cfg.rope_theta)
                    scores[:, :sinks] = (q_at[:, hq] @ k[:sinks, hk].T) * scale
            sparse = cfg.layer_specs[i].options.get("sparse", cfg.block_sparse)
            if sparse is not None:
                allowed &= torch.tensor([[_sparse_allowed(sparse, a, b) for b in range(n)] for a in range(n)])
            if cfg.pos == "alibi":
                scores = scores + _alibi_slope(hq, Hq) * (pos[None, :] - pos[:, None])
            if cfg.pos == "t5":
                table = P["embed_relative.relative_attention_bias.weight"][:, hq]
                scores = scores + torch.stack([torch.stack([
                    table[_t5_bucket(max(a - b, 0), cfg.relative_buckets, cfg.relative_max_distance)]
                    for b in range(n)]) for a in range(n)])
            scores = scores.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, hk])
        attn = _linear(P, pre + ".self_attn.o_proj", torch.cat(heads, -1))
        x = _block_rest(cfg, P, pre, x, h, attn)
    x = _norm(cfg, P, "norm", x)
    head = P["embed_tokens.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    return x @ head.T


def _t5_bidirectional_bucket(relative: int, buckets: int, max_distance: int) -> int:
    """T5's encoder bucket of ``k - q``: half the buckets for keys after the query, half for the
    rest, each half bucketed like the decoder's distances."""
    half = buckets // 2
    return (half if relative > 0 else 0) + _t5_bucket(abs(relative), half, max_distance)


def _naive_attention(cfg, q, k, v, scores_extra, allowed):
    """Per query head: softmax(q·k · scale + extra, masked) · v with KV head h // group."""
    Hq, Hkv = q.shape[1], k.shape[1]
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1 / math.sqrt(q.shape[-1])
    heads = []
    for hq in range(Hq):
        hk = hq // (Hq // Hkv)
        scores = (q[:, hq] @ k[:, hk].T) * scale
        if scores_extra is not None:
            scores = scores + scores_extra(hq)
        heads.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v[:, hk])
    return torch.cat(heads, -1)


def naive_seq2seq_logits(model, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Logits (len(tgt), vocab) in float64 of an encoder–decoder for one unpadded source and target:
    a bidirectional MHA encoder, then decoder layers of causal self-attention (n_kv_head heads, CLA
    by kv_sources), cross-attention to the encoder output (cross_n_kv_head heads, shared by
    cross_cla) and the MLP; RoPE or T5's relative bias (one table per stack, none in cross-attention)."""
    cfg = model.cfg
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    D = cfg.head_dim

    def positional(prefix, n_q, n_k, bidirectional):
        if cfg.pos != "t5":
            return None
        table = P[prefix + "embed_relative.relative_attention_bias.weight"]
        if bidirectional:
            idx = [[_t5_bidirectional_bucket(b - a, cfg.relative_buckets, cfg.relative_max_distance)
                    for b in range(n_k)] for a in range(n_q)]
        else:
            idx = [[_t5_bucket(max(a - b, 0), cfg.relative_buckets, cfg.relative_max_distance)
                    for b in range(n_k)] for a in range(n_q)]
        idx = torch.tensor(idx)
        return lambda h: table[idx, h]

    def self_qkv(pre, h, pos, n_kv):
        n = h.shape[0]
        q = _linear(P, pre + ".q_proj", h).view(n, cfg.n_head, D)
        k = _linear(P, pre + ".k_proj", h).view(n, n_kv, D) if pre + ".k_proj.weight" in P else None
        v = _linear(P, pre + ".v_proj", h).view(n, n_kv, D) if pre + ".v_proj.weight" in P else None
        if cfg.pos == "rope":
            q = _rope(q, pos, cfg.rope_theta)
            k = _rope(k, pos, cfg.rope_theta) if k is not None else None
        return q, k, v

    S, T = len(src), len(tgt)
    x = P["embed_tokens.weight"][src]
    spos = torch.arange(S)
    enc_bias = positional("encoder.", S, S, True)
    for i in range(cfg.n_encoder_layer):
        pre = f"encoder.layers.{i}"
        h = _norm(cfg, P, pre + ".input_layernorm", x)
        q, k, v = self_qkv(pre + ".self_attn", h, spos, cfg.n_head)
        attn = _linear(P, pre + ".self_attn.o_proj",
                       _naive_attention(cfg, q, k, v, enc_bias, torch.ones(S, S, dtype=torch.bool)))
        x = _block_rest(cfg, P, pre, x, h, attn)
    memory = _norm(cfg, P, "encoder.norm", x)

    y = P["embed_tokens.weight"][tgt]
    tpos = torch.arange(T)
    dec_bias = positional("", T, T, False)
    causal = tpos[None, :] <= tpos[:, None]
    self_kv, cross_kv = {}, {}
    for i in range(cfg.n_layer):
        pre = f"layers.{i}"
        h = _norm(cfg, P, pre + ".input_layernorm", y)
        q, k, v = self_qkv(pre + ".self_attn", h, tpos, cfg.n_kv_head)
        if k is not None:
            self_kv[i] = (k, v)
        k, v = self_kv[cfg.kv_sources[i]]
        allowed = causal
        if cfg.layer_window(i) is not None:          # a sliding window over the target
            allowed = causal & ((tpos[:, None] - tpos[None, :]) < cfg.layer_window(i))
        y = y + _linear(P, pre + ".self_attn.o_proj", _naive_attention(cfg, q, k, v, dec_bias, allowed))
        h = _norm(cfg, P, pre + ".cross_attn_layernorm", y)
        q = _linear(P, pre + ".cross_attn.q_proj", h).view(T, cfg.n_head, D)
        if pre + ".cross_attn.k_proj.weight" in P:
            cross_kv[i] = (_linear(P, pre + ".cross_attn.k_proj", memory).view(S, cfg.cross_n_kv_head, D),
                           _linear(P, pre + ".cross_attn.v_proj", memory).view(S, cfg.cross_n_kv_head, D))
        k, v = cross_kv[cfg.cross_kv_sources[i]]
        y = y + _linear(P, pre + ".cross_attn.o_proj",
                        _naive_attention(cfg, q, k, v, None, torch.ones(T, S, dtype=torch.bool)))
        h = _norm(cfg, P, pre + ".post_attention_layernorm", y)
        y = y + _mlp(cfg, P, pre, h)
    y = _norm(cfg, P, "norm", y) * cfg.output_scale
    head = P["embed_tokens.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    return y @ head.T


def rope_matrices(positions, D: int, theta: float):
    """RoPE in the half-split layout as explicit ``(T, D, D)`` float64 matrices (numpy), one per position."""
    import numpy as np

    inv = theta ** (-np.arange(0, D, 2) / D)
    R = np.zeros((len(positions), D, D))
    h = D // 2
    for t, p in enumerate(positions):
        c, s = np.cos(p * inv), np.sin(p * inv)
        R[t, np.arange(h), np.arange(h)] = c
        R[t, np.arange(h, D), np.arange(h, D)] = c
        R[t, np.arange(h), np.arange(h, D)] = -s
        R[t, np.arange(h, D), np.arange(h)] = s
    return R

"""An independent float64 implementation of a kvlab model, for tests.

Written from the definitions, one sequence and one head at a time, with no code shared with
kvlab: RoPE pair by pair, query head h reading KV head h // group, CLA consumers reading the
K/V of the layer named by kv_source, causal + sliding-window masks from positions.
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
    group = Hq // Hkv
    kv = {}
    for i in range(cfg.n_layer):
        pre = f"layers.{i}"
        h = _norm(cfg, P, pre + ".input_layernorm", x)
        q = _linear(P, pre + ".self_attn.q_proj", h).view(n, Hq, D)
        src = cfg.kv_sources[i]
        if src == i:
            k = _linear(P, pre + ".self_attn.k_proj", h).view(n, Hkv, D)
            v = _linear(P, pre + ".self_attn.v_proj", h).view(n, Hkv, D)
            if cfg.pos == "rope":
                k = _rope(k, pos, cfg.rope_theta)
            kv[i] = (k, v)
        k, v = kv[src]
        if cfg.pos == "rope":
            q = _rope(q, pos, cfg.rope_theta)
        heads = []
        for hq in range(Hq):
            hk = hq // group
            scores = (q[:, hq] @ k[:, hk].T) / math.sqrt(D)
            allowed = pos[None, :] <= pos[:, None]
            window = cfg.layer_window(i)          # the layer's own window, else the model's
            if window is not None:
                allowed &= (pos[:, None] - pos[None, :]) < window
            scores = scores.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, hk])
        attn = _linear(P, pre + ".self_attn.o_proj", torch.cat(heads, -1))
        if cfg.block == "parallel":
            mlp_in = h
        else:
            x = x + attn
            mlp_in = _norm(cfg, P, pre + ".post_attention_layernorm", x)
        if cfg.mlp == "swiglu":
            g = _linear(P, pre + ".mlp.gate_proj", mlp_in)
            m = _linear(P, pre + ".mlp.down_proj", g * torch.sigmoid(g) * _linear(P, pre + ".mlp.up_proj", mlp_in))
        else:
            u = _linear(P, pre + ".mlp.up_proj", mlp_in)
            m = _linear(P, pre + ".mlp.down_proj", 0.5 * u * (1 + torch.erf(u / math.sqrt(2))))
        x = x + attn + m if cfg.block == "parallel" else x + m
    x = _norm(cfg, P, "norm", x)
    head = P["embed_tokens.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    return x @ head.T

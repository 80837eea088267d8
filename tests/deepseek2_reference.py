"""llama.cpp's deepseek2 graph (src/models/deepseek2.cpp, the absorbed MLA path: adjacent rotary pairs,
the RMS-normalised latent, one latent + RoPE key read by every head) in float64 NumPy from a GGUF
file's own tensors: the reference kvlab's deepseek2 exports are checked against where llama.cpp is
not installed (tests/io/test_gguf_deepseek2.py, tests/recipes/test_shrink_targets.py)."""

import numpy as np
from gguf import GGUFReader


def _fields(reader: GGUFReader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("deepseek2.") and len(f.data) == 1:
            out[name] = f.parts[f.data[0]].tolist()[0]
    return out


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_pairs(x, pos, theta):
    """GGML's NORM rotation: adjacent pairs (x0, x1), (x2, x3)... at frequencies theta^(-2i/n)."""
    n = x.shape[-1]
    inv = theta ** (-np.arange(0, n, 2) / n)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def gguf_tensors(path) -> dict[str, np.ndarray]:
    """The file's tensors as float64 arrays in NumPy's order (GGUF's shape reversed)."""
    return {x.name: np.asarray(x.data, dtype=np.float64).reshape([int(d) for d in reversed(x.shape)])
            for x in GGUFReader(str(path)).tensors}


def deepseek2_logits(path, tokens, tensors: dict | None = None) -> np.ndarray:
    """llama.cpp's deepseek2 graph (src/models/deepseek2.cpp, the absorbed MLA path) from the file
    (``tensors``: the file's, changed, to see what a change does)."""
    f = _fields(GGUFReader(str(path)))
    t = tensors if tensors is not None else gguf_tensors(path)
    H, L = f["deepseek2.attention.head_count"], f["deepseek2.block_count"]
    rank, R = f["deepseek2.attention.kv_lora_rank"], f["deepseek2.rope.dimension_count"]
    N = f["deepseek2.attention.key_length_mla"] - R
    eps, theta = f["deepseek2.attention.layer_norm_rms_epsilon"], f["deepseek2.rope.freq_base"]
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = t["token_embd.weight"][tokens]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(L):
        b = f"blk.{i}."
        h = _rms(x, t[b + "attn_norm.weight"], eps)
        if b + "attn_q.weight" in t:
            q = h @ t[b + "attn_q.weight"].T
        else:                       # query compression: q_a, its RMSNorm, q_b
            q = _rms(h @ t[b + "attn_q_a.weight"].T, t[b + "attn_q_a_norm.weight"], eps) @ t[b + "attn_q_b.weight"].T
        q = q.reshape(T, H, N + R)
        kv = h @ t[b + "attn_kv_a_mqa.weight"].T
        c = _rms(kv[:, :rank], t[b + "attn_kv_a_norm.weight"], eps)
        k_pe = _rope_pairs(kv[:, rank:], pos, theta)
        q_pe = _rope_pairs(q[:, :, N:].transpose(1, 0, 2), pos, theta)               # (H, T, R)
        q_abs = np.einsum("thn,hcn->htc", q[:, :, :N], t[b + "attn_k_b.weight"])       # (H, T, rank)
        s = (np.einsum("htc,sc->hts", q_abs, c) + np.einsum("htr,sr->hts", q_pe, k_pe)) / np.sqrt(N + R)
        p = np.exp(s + causal - (s + causal).max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hts,sc->htc", p, c)                                             # over the latent
        o = np.einsum("htc,hvc->thv", o, t[b + "attn_v_b.weight"]).reshape(T, -1)
        x = x + o @ t[b + "attn_output.weight"].T
        h = _rms(x, t[b + "ffn_norm.weight"], eps)
        g, u = h @ t[b + "ffn_gate.weight"].T, h @ t[b + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t[b + "ffn_down.weight"].T
    x = _rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T

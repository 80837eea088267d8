"""The ``linear`` attention kind: kernelized (linear) attention with a recurrent state.

Softmax attention's ``exp(q·k)`` is replaced by a feature-map product ``φ(q)·φ(k)``, so the sum over
the past factorises into a state (Katharopoulos et al. 2020), optionally decayed per head as in
RetNet:

    S_t = γ_t S_{t-1} + φ(k_t) v_tᵀ,    z_t = γ_t z_{t-1} + φ(k_t),    o_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + ε)

One computation, two forms: the **chunked** form (training, prefill) processes ``CHUNK`` tokens at a
time — inside a chunk as a decay-weighted, causally masked ``φ(Q) φ(K)ᵀ`` product, across chunks
through the state — and the **recurrent** form (decoding) is the same code on one-token chunks,
starting from the cached state (:mod:`kvlab.cache.state`): per row a fixed ``n_kv_head × F × Dv``
state whatever the length. Decays are applied as per-token log-decays that are zero for padding,
so a padded token neither writes to nor decays a row's state.

Layer options: ``feature`` — ``elu`` (φ(x) = elu(x) + 1, F = head_dim) or ``hedgehog`` (a learned
per-head linear map followed by ``[softmax(Wx), softmax(-Wx)]``, F = 2·head_dim, Zhang et al. 2024 —
the map LoLCATs fits to imitate softmax attention); ``decay`` — ``none`` or ``retnet``
(γ_j = 1 − 2^(−5−j) for KV head j). Queries are grouped onto the KV heads' states (GQA). No
positional encoding: order comes from causality and the decay.

On CUDA, where flash-linear-attention (``fla-core``) is installed and the backend is ``auto`` or
``triton``, training and prefill of layers with one query head per KV head run its
``chunk_simple_gla`` kernel (:func:`fla_linear_attention`):
the same state update with a per-token, per-head log-decay, and the normaliser ``z`` carried as one
extra value channel of ones. The PyTorch chunked form here is the reference, the CPU path and the
decode path (one token needs no kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.attention.context import ForwardContext
from kvlab.cache.state import STATE_DTYPE, RecurrentStateLayer
from kvlab.config.model import ModelConfig
from kvlab.dtypes import dtype_bytes
from kvlab.errors import ConfigError
from kvlab.registry import AttentionKind, CacheBytes, Capabilities, register_kind

CHUNK = 64
EPS = 1e-6
FEATURES = ("elu", "hedgehog")
DECAYS = ("none", "retnet")


def feature_width(cfg: ModelConfig, layer: int) -> int:
    return cfg.head_dim * (2 if _option(cfg, layer, "feature") == "hedgehog" else 1)


def _option(cfg: ModelConfig, layer: int, name: str) -> str:
    return cfg.layer_options(layer)[name]


def retnet_log_decay(n_heads: int) -> torch.Tensor:
    """log γ_j, γ_j = 1 − 2^(−5−j): RetNet's per-head decays (j = 0 remembers longest)."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64)))).float()


def chunked_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                             S: torch.Tensor, z: torch.Tensor, chunk: int = CHUNK
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised linear attention in chunks. ``fq (B, Hkv, G, T, F)`` query features grouped by KV
    head, ``fk (B, Hkv, T, F)``, ``v (B, Hkv, T, Dv)``, ``log_decay (B|1, Hkv, T)`` per-token log γ
    (0 for padding or no decay), initial ``S (B, Hkv, F, Dv)``, ``z (B, Hkv, F)``. Returns the
    outputs ``(B, Hkv, G, T, Dv)`` and the final ``S, z``; all in the inputs' dtype (float32 or
    wider inside)."""
    out = []
    T = fk.shape[2]
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        q, k, vv = fq[..., c0:c1, :], fk[:, :, c0:c1], v[:, :, c0:c1]
        A = log_decay[..., c0:c1].cumsum(-1)                                 # (B|1, Hkv, C) inclusive
        n = c1 - c0
        causal = torch.ones(n, n, dtype=torch.bool, device=fk.device).tril()
        # exp(A_t - A_s) for s <= t (<= 1), zero above the diagonal (masked before exp: no overflow).
        gap = (A.unsqueeze(-1) - A.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
        D = gap.exp().unsqueeze(2)                                             # (B|1, Hkv, 1, C, C)
        scores = torch.einsum("bhgtf,bhsf->bhgts", q, k) * D
        into = A.exp().unsqueeze(2).unsqueeze(-1)                              # decay of the old state
        num = scores @ vv.unsqueeze(2) + into * torch.einsum("bhgtf,bhfd->bhgtd", q, S)
        den = scores.sum(-1, keepdim=True) + into * torch.einsum("bhgtf,bhf->bhgt", q, z).unsqueeze(-1)
        out.append(num / (den + EPS))
        last = A[..., -1:]                                                     # (B|1, Hkv, 1)
        w = (last - A).exp().unsqueeze(-1)                                     # decay from s to the chunk end
        S = last.exp().unsqueeze(-1) * S + torch.einsum("bhsf,bhsd->bhfd", k * w, vv)
        z = last.exp() * z + (k * w).sum(2)
    return torch.cat(out, 3), S, z


def fla_available(x: torch.Tensor, backend: str, group: int = 1) -> bool:
    """Whether this call may use flash-linear-attention's kernels: a CUDA tensor, a backend that
    allows kernels (``auto`` or ``triton``; ``reference``/``sdpa``/``flash`` keep the PyTorch form),
    one query head per KV head (the kernel would need copies of K/V per query head otherwise) and
    the ``fla`` package installed."""
    if not x.is_cuda or backend not in ("auto", "triton") or group != 1:
        return False
    import importlib.util

    return importlib.util.find_spec("fla") is not None


def fla_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                         S: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunked_linear_attention` (same arguments and results) through flash-linear-attention's
    ``chunk_simple_gla``: ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = q_tᵀ S_t`` with ``scale=1``.
    Values get one extra channel of ones, so the same state carries ``z`` and the output's last
    channel is the normaliser ``φ(q)ᵀz``. One query head per KV head (``G == 1``): the kernel keeps
    one state per query head, and kvlab never copies keys and values per query head, so grouped
    layers keep the PyTorch form (:func:`fla_available`)."""
    from fla.ops.simple_gla import chunk_simple_gla

    B, Hkv, G, T, Fdim = fq.shape
    if G != 1:
        raise ValueError(f"fla_linear_attention takes one query head per KV head, got {G}")
    Dv = v.shape[-1]
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    q = fq[:, :, 0].transpose(1, 2)                                           # (B, T, H, F)
    vz = torch.cat([v, ones], -1).transpose(1, 2)                             # (B, T, H, Dv + 1)
    g = log_decay.expand(B, Hkv, T).transpose(1, 2)                           # (B, T, H)
    h0 = torch.cat([S, z.unsqueeze(-1)], -1)                                  # (B, H, F, Dv + 1)
    o, h = chunk_simple_gla(q.contiguous(), fk.transpose(1, 2).contiguous(), vz.contiguous(), g=g.contiguous(),
                            scale=1.0, initial_state=h0.contiguous(), output_final_state=True)
    o = o.transpose(1, 2).unsqueeze(2)                                        # (B, H, 1, T, Dv + 1)
    return o[..., :Dv] / (o[..., Dv:] + EPS), h[..., :Dv], h[..., Dv]


class LinearAttention(nn.Module):
    """Linear attention with a feature map, an optional decay and a recurrent state cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.feature = _option(cfg, layer_idx, "feature")
        self.decay = _option(cfg, layer_idx, "decay")
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.o_bias)
        if self.feature == "hedgehog":       # one learned map per query head and per KV head
            D = cfg.head_dim
            self.feature_q = nn.Parameter(torch.stack([torch.eye(D)] * cfg.n_head))      # identity at init
            self.feature_k = nn.Parameter(torch.stack([torch.eye(D)] * cfg.n_kv_head))

    def _features(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """φ(x) for ``x (B, H, T, D)``."""
        if self.feature == "elu":
            return F.elu(x) + 1.0
        W = self.feature_q if which == "q" else self.feature_k
        y = torch.einsum("bhtd,hde->bhte", x, W.to(x.dtype))
        return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.q_seg is not None:
            raise ConfigError("linear attention does not take packed rows (its state would flow across documents); "
                              "turn packing off")
        if ctx.prefix is not None:
            raise ConfigError("prefix tuning is not available for linear attention; use LoRA or prompt tuning")
        B, T, _ = x.shape
        work = torch.promote_types(x.dtype, STATE_DTYPE)      # running sums in float32 (or float64) at least
        fq = self._features(self._heads(self.q_proj(x), self.n_head), "q").to(work)
        fk = self._features(self._heads(self.k_proj(x), self.n_kv_head), "k").to(work)
        v = self._heads(self.v_proj(x), self.n_kv_head).to(work)
        valid = ctx.q_valid
        if valid is not None:                                  # padding writes nothing ...
            fk = fk * valid[:, None, :, None].to(work)
        if self.decay == "retnet":                             # ... and decays nothing
            log_decay = retnet_log_decay(self.n_kv_head).to(fk.device, work).view(1, -1, 1).expand(1, -1, T)
            if valid is not None:
                log_decay = log_decay * valid[:, None, :].to(work)
        else:
            log_decay = torch.zeros(1, 1, T, dtype=work, device=x.device)
        Fdim = fk.shape[-1]
        if ctx.cache is not None:
            S, z = ctx.cache.layers[self.layer_idx].read()
            S, z = S.to(work), z.to(work)
        else:
            S = torch.zeros(B, self.n_kv_head, Fdim, self.head_dim, dtype=work, device=x.device)
            z = torch.zeros(B, self.n_kv_head, Fdim, dtype=work, device=x.device)
        G = self.n_head // self.n_kv_head
        run = fla_linear_attention if T > 1 and fla_available(x, ctx.backend, G) else chunked_linear_attention
        out, S, z = run(fq.reshape(B, self.n_kv_head, G, T, Fdim), fk, v, log_decay, S, z)
        if ctx.cache is not None:
            ctx.cache.update(self.layer_idx, S, z, step=ctx.step)
        out = out.reshape(B, self.n_head, T, self.head_dim).to(x.dtype)
        if valid is not None:
            out = out * valid[:, None, :, None].to(out.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def _cache_layer(cfg: ModelConfig, layer: int, batch_size: int, max_len: int, dtype: torch.dtype,
                 device) -> RecurrentStateLayer:
    return RecurrentStateLayer(batch_size, cfg.n_kv_head, feature_width(cfg, layer), cfg.head_dim, device=device)


def _cache_bytes(cfg: ModelConfig, layer: int, dtype) -> CacheBytes:
    Fdim = feature_width(cfg, layer)
    # float32 states whatever the cache dtype or quantization (see kvlab.cache.state)
    return CacheBytes(per_sequence=cfg.n_kv_head * (Fdim * cfg.head_dim + Fdim) * dtype_bytes(STATE_DTYPE))


def _param_count(cfg: ModelConfig, layer: int) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    q_out, kv_out = cfg.n_head * hd, cfg.n_kv_head * hd
    bias = 1 if cfg.qkv_bias else 0
    count = (d + bias) * q_out + 2 * (d + bias) * kv_out + q_out * d + (d if cfg.o_bias else 0)
    if _option(cfg, layer, "feature") == "hedgehog":
        count += (cfg.n_head + cfg.n_kv_head) * hd * hd
    return count


def _validate(cfg: ModelConfig, layer: int, options: dict) -> None:
    for name, allowed in (("feature", FEATURES), ("decay", DECAYS)):
        if name in options and options[name] not in allowed:
            raise ConfigError(f"layer {layer}: linear attention {name}={options[name]!r} is not one of {list(allowed)}")
    if cfg.kv_sources[layer] != layer or any(s == layer for j, s in enumerate(cfg.kv_sources) if j != layer):
        raise ConfigError(f"layer {layer}: a linear-attention layer keeps its own state; it cannot share KV across "
                          f"layers (CLA)")
    if cfg.layer_sparse(layer) is not None:
        raise ConfigError(f"layer {layer}: linear attention has no block-sparse layout (its state summarises all the "
                          f"past); give the layout to the softmax layers only")
    if cfg.layer_window(layer) is not None:
        raise ConfigError(f"layer {layer}: linear attention has no window (its state summarises all the past); give "
                          f"the window to the softmax layers only")
    if cfg.pos == "learned":
        raise ConfigError("linear attention is used without position embeddings here (pos='rope' or 'alibi' set the "
                          "softmax layers' positions; linear layers take order from causality and decay)")


LINEAR = register_kind(AttentionKind(
    name="linear", module=LinearAttention, cache_layer=_cache_layer, cache_bytes=_cache_bytes,
    param_count=_param_count, options=("feature", "decay"), validate=_validate,
    option_defaults=lambda cfg, options: {"feature": "elu", "decay": "none"},
    reach=lambda cfg, layer: 0,       # no positions: order comes from causality and decay
    label=lambda cfg, layers: f"Linear-{cfg.n_kv_head}",       # one state per KV head: no cache that grows
    describe=lambda cfg, layers: (f"{cfg.n_head} query, {cfg.n_kv_head} KV heads of state (group {cfg.q_per_kv}), "
                                  f"head_dim {cfg.head_dim}"),
    # A float32 state per KV head: nothing per token to quantize or prefix; fewer KV heads shrink it.
    capabilities=Capabilities(kv_heads=True),
    description="kernelized linear attention (elu+1 or Hedgehog features, optional RetNet decay) with a "
                "fixed-size recurrent state",
    examples={
        "linear-elu": dict(attn_kind="linear"),
        "linear-hedgehog-retnet-gqa": dict(n_kv_head=2, attention_layers=[
            {"kind": "linear", "feature": "hedgehog", "decay": "retnet"}] * 4),
        # A hybrid: linear layers with a state, softmax layers with a KV cache.
        "linear-hybrid": dict(n_kv_head=2, attention_layers=[
            {"kind": "linear", "decay": "retnet"}, "gqa", "linear", "gqa"]),
    }))

"""Calibrated merging of KV heads: the merged keys and values are fitted to reproduce the original
ones on calibration activations, and the queries and output projection absorb what the shared
head cannot carry (a starting point for GQA/MQA far better than averaging weights).

Everything is computed from one statistic per layer, the second moment ``S = E[x̂ x̂ᵀ]`` of the
attention input ``x̂ = (x, 1)`` (the post-norm hidden state, with a 1 for the biases) over a few
thousand calibration tokens: keys, values and queries are linear in ``x̂``, so every Gram matrix
needed below is ``W S Wᵀ``.

**Keys** (RoPE-aware). RoPE rotates each frequency pair ``(j, j + D/2)`` of a key as a complex
number ``κ_j = k_j + i·k_{j+D/2}``, multiplied by ``e^{i·pos·θ_j}``; the score is
``Σ_j Re(κ^q_j · conj(κ^k_j) · e^{i(m-n)θ_j})``. A per-head complex factor ``c_{h,j}`` commutes with
that rotation (this is the "align heads with transforms that commute with RoPE" of the literature,
in its exact form: a rotation-and-scaling within each frequency pair). So for the ``r`` old heads
merged into one, per pair ``j``: find the shared ``z_j`` and factors ``c_{h,j}`` minimizing
``Σ_h w²_{h,j} E|κ_{h,j} − c_{h,j} z_j|²`` — a rank-1 approximation of the weighted complex matrix
``[w_h κ_h]`` (its top eigenvector of the r×r Hermitian Gram). The weight ``w²_{h,j}`` is the
energy ``E|κ^q_j|²`` of the query heads that read head ``h``, since a key error matters in proportion
to the queries that meet it. The queries of head ``h``'s group are multiplied by ``conj(c_{h,j})``
per pair (a 2×2 block on their ``q_proj`` rows), so ``q' · z = q · (c z) ≈ q · κ_h``.

**Values** (no RoPE). The new value is the top-``D`` principal subspace of the ``r`` stacked old
values, whitened by what the output projection does with them: with
``M_h = Σ_{g reads h} W_o,gᵀ W_o,g`` the error that reaches the residual stream is
``‖M_h^{1/2}(v_h − B_h v)‖``; the principal subspace ``P`` of ``M^{1/2} v`` gives ``v = Pᵀ M^{1/2} v_old``
and ``B_h = M_h^{-1/2} P_h``, which is folded into ``o_proj``'s columns of the query heads reading ``h``.

Merging ``r = 1`` heads (no change) reproduces the model exactly; the tests check that, and that
the calibrated MQA of a trained model is closer to it than mean pooling.
"""

from __future__ import annotations

import torch

from kvlab.config.model import ModelConfig
from kvlab.errors import ConfigError

EPS = 1e-6


@torch.no_grad()
def attention_input_moments(model, batches) -> dict[int, torch.Tensor]:
    """Per layer, ``E[x̂ x̂ᵀ]`` in float64 of the attention inputs ``x̂ = (x, 1)`` over ``batches``
    (token tensors ``(B, T)``); tokens of every row and position count alike."""
    sums: dict[int, torch.Tensor] = {}
    count = 0
    hooks = []

    def hook(layer):
        def record(module, args):
            x = args[0].detach().double().flatten(0, 1)
            xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
            sums[layer] = sums.get(layer, 0) + xa.T @ xa
        return record

    for i, block in enumerate(model.layers):
        hooks.append(block.self_attn.register_forward_pre_hook(hook(i)))
    was_training = model.training
    model.eval()
    try:
        for tokens in batches:
            model(tokens.to(model.device))
            count += tokens.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not count:
        raise ConfigError("calibration needs at least one batch of tokens")
    return {i: s.cpu() / count for i, s in sums.items()}


def _augmented(state: dict, prefix: str) -> torch.Tensor:
    """``[W | b]`` of a linear layer (a zero bias column without a bias), float64."""
    w = state[f"{prefix}.weight"].double()
    b = state.get(f"{prefix}.bias")
    b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.double()
    return torch.cat([w, b.unsqueeze(1)], 1)


def _sym_power(m: torch.Tensor, power: float) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    vals = vals.clamp_min(vals.max() * EPS)
    return (vecs * vals.pow(power)) @ vecs.T


def _merge_keys(wk: list[torch.Tensor], S: torch.Tensor, q_energy: torch.Tensor):
    """``wk``: the r heads' augmented key rows ``(D, d+1)``; ``q_energy (r, D/2)``: the query energy
    per head and pair. Returns the new rows ``(D, d+1)`` and the complex factors ``c (r, D/2)``."""
    r, D = len(wk), wk[0].shape[0]
    half = D // 2
    a = torch.stack([w[:half] for w in wk])            # (r, D/2, d+1): real parts
    b = torch.stack([w[half:] for w in wk])            # imaginary parts
    new = torch.zeros_like(wk[0])
    c = torch.zeros(r, half, dtype=torch.complex128)
    for j in range(half):
        A, B = a[:, j], b[:, j]                         # (r, d+1)
        gram = (A @ S @ A.T + B @ S @ B.T) + 1j * (A @ S @ B.T - B @ S @ A.T)   # E[conj(κ_h) κ_h']
        w = q_energy[:, j].clamp_min(EPS).sqrt().to(torch.complex128)
        vals, vecs = torch.linalg.eigh(w.conj().unsqueeze(1) * gram * w.unsqueeze(0))
        v = vecs[:, -1]                                  # top eigenvector (unit norm)
        u = w * v                                        # z = Σ_h u_h κ_h
        new[j] = (u.real.unsqueeze(1) * A - u.imag.unsqueeze(1) * B).sum(0)
        new[half + j] = (u.imag.unsqueeze(1) * A + u.real.unsqueeze(1) * B).sum(0)
        c[:, j] = v.conj() / w                           # κ_h ≈ c_h z
    return new, c


def _rotate_query_rows(wq: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Multiply each pair of a head's query rows ``(D, d+1)`` by the complex ``m (D/2,)``."""
    half = wq.shape[0] // 2
    qa, qb = wq[:half], wq[half:]
    al, be = m.real.unsqueeze(1), m.imag.unsqueeze(1)
    return torch.cat([al * qa - be * qb, be * qa + al * qb])


def _merge_values(wv: list[torch.Tensor], S: torch.Tensor, metric: list[torch.Tensor]):
    """``wv``: the r heads' augmented value rows ``(D, d+1)``; ``metric``: ``M_h (D, D)`` per head.
    Returns the new rows ``(D, d+1)`` and ``B_h (D, D)`` per head (v_h ≈ B_h v)."""
    D = wv[0].shape[0]
    half_m = [_sym_power(m, 0.5) for m in metric]
    stacked = torch.cat([hm @ w for hm, w in zip(half_m, wv)])          # (r·D, d+1): whitened values
    cov = stacked @ S @ stacked.T
    vals, vecs = torch.linalg.eigh(cov)
    P = vecs[:, -D:].flip(1)                                             # top-D principal directions
    new = P.T @ stacked
    blocks = [_sym_power(m, -0.5) @ P[h * D:(h + 1) * D] for h, m in enumerate(metric)]
    return new, blocks


def calibrated_state(model, new_cfg: ModelConfig, moments: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with its KV heads merged into ``new_cfg.n_kv_head`` by calibrated
    fitting (queries and output projections adjusted); the wiring (``kv_sources``) is unchanged."""
    cfg = model.cfg
    if new_cfg.kv_sources != cfg.kv_sources:
        raise ConfigError("calibrated merging pools KV heads within layers; convert cross-layer sharing (--cla) "
                          "with --method mean, or merge heads first and share layers in a second conversion")
    if cfg.pos != "rope":
        raise ConfigError("calibrated merging is RoPE-aware and needs pos='rope'; use --method mean")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not (cfg.tie_embeddings and k == "lm_head.weight")}
    dtype = state["embed_tokens.weight"].dtype
    D = cfg.head_dim
    r = cfg.n_kv_head // new_cfg.n_kv_head
    G = cfg.q_per_kv                              # query heads per old KV head
    for p in cfg.kv_producers:
        readers = [i for i, s in enumerate(cfg.kv_sources) if s == p]
        S = moments[p]
        wk_all = _augmented(state, f"layers.{p}.self_attn.k_proj")
        wv_all = _augmented(state, f"layers.{p}.self_attn.v_proj")
        wq = {i: _augmented(state, f"layers.{i}.self_attn.q_proj") for i in readers}
        wo = {i: state[f"layers.{i}.self_attn.o_proj.weight"].double() for i in readers}
        new_k, new_v = [], []
        for grp in range(new_cfg.n_kv_head):
            heads = list(range(grp * r, (grp + 1) * r))
            q_energy = torch.zeros(r, D // 2, dtype=torch.float64)
            metric = [torch.zeros(D, D, dtype=torch.float64) for _ in heads]
            for n, h in enumerate(heads):
                for i in readers:
                    Si = moments[i]
                    for g in range(h * G, (h + 1) * G):
                        rows = wq[i][g * D:(g + 1) * D]
                        e = torch.einsum("ij,jk,ik->i", rows, Si, rows)            # E[q_row²]
                        q_energy[n] += e[:D // 2] + e[D // 2:]
                        cols = wo[i][:, g * D:(g + 1) * D]
                        metric[n] += cols.T @ cols
            k_rows, c = _merge_keys([wk_all[h * D:(h + 1) * D] for h in heads], S, q_energy)
            v_rows, blocks = _merge_values([wv_all[h * D:(h + 1) * D] for h in heads], S, metric)
            new_k.append(k_rows)
            new_v.append(v_rows)
            for n, h in enumerate(heads):
                for i in readers:
                    for g in range(h * G, (h + 1) * G):
                        wq[i][g * D:(g + 1) * D] = _rotate_query_rows(wq[i][g * D:(g + 1) * D], c[n].conj())
                        wo[i][:, g * D:(g + 1) * D] = wo[i][:, g * D:(g + 1) * D] @ blocks[n]
        _store(state, f"layers.{p}.self_attn.k_proj", torch.cat(new_k), dtype)
        _store(state, f"layers.{p}.self_attn.v_proj", torch.cat(new_v), dtype)
        for i in readers:
            _store(state, f"layers.{i}.self_attn.q_proj", wq[i], dtype)
            state[f"layers.{i}.self_attn.o_proj.weight"] = wo[i].to(dtype)
    return state


def _store(state: dict, prefix: str, aug: torch.Tensor, dtype: torch.dtype) -> None:
    state[f"{prefix}.weight"] = aug[:, :-1].to(dtype).contiguous()
    if f"{prefix}.bias" in state:
        state[f"{prefix}.bias"] = aug[:, -1].to(dtype).contiguous()

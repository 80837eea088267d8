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
per pair (a 2×2 block on their ``q_proj`` rows), so ``q' · z = q · (c z) ≈ q · κ_h``. The fit
fixes each factor's phase; its magnitude is then set so that ``E|c_{h,j} z_j|² = E|κ_{h,j}|²``: a
least-squares fit shrinks what it cannot explain, which would flatten the attention of the heads
it fits worst (measured on SmolLM2 at α = 0: MQA perplexity 121.5 → 115.0, CLA2 2,957 → 2,689,
MQA-CLA2 42,430 → 30,516 on 8,192 validation tokens).

**Keys without RoPE** (learned positions, ALiBi, T5's bias, cross-attention). Nothing rotates a key,
so each old head's keys may be any ``D×D`` map ``A_h`` of the shared ones: the new key is the top-``D``
principal subspace of the old keys whitened by their queries' ``E[q qᵀ]`` (the score error
``E(q·(k_h − A_h z))²``), exactly the values' fit below with that metric, and ``A_hᵀ`` is folded
into the queries' rows.

**Values** (no RoPE). The new value is the top-``D`` principal subspace of the ``r`` stacked old
values, whitened by what the output projection does with them: with
``M_h = Σ_{g reads h} W_o,gᵀ W_o,g`` the error that reaches the residual stream is
``‖M_h^{1/2}(v_h − B_h v)‖``; the principal subspace ``P`` of ``M^{1/2} v`` gives ``v = Pᵀ M^{1/2} v_old``
and ``B_h = M_h^{-1/2} P_h``, which is folded into ``o_proj``'s columns of the query heads reading ``h``.

**Layers** (CLA). A consumer that reads a new producer ``p`` saw the keys and values of its old
source layer ``a``; expressed as least-squares functions of ``p``'s input (the cross-moment
``E[x̂_a x̂_pᵀ]`` over the same calibration tokens), they are more columns of the same fit, with the
consumer's own queries and output projection absorbing their factors.

**Encoder–decoders.** The decoder's self-attention merges as above (calibration batches are
source/target pairs; the moments are taken over the target tokens). Its cross-attention keys and
values are all linear in the one encoder output, so its heads *and* layers (``cross_cla``) merge as
more columns of one fit over the encoder output's moment, with no regression between layers.

Merging nothing reproduces the model exactly; the tests check that, exact merges where one exists,
and that the calibrated conversions of a trained model are closer to it than mean pooling.
"""

from __future__ import annotations

import torch

from kvlab.config.model import ModelConfig
from kvlab.convert.finish import source_state
from kvlab.errors import ConfigError
from kvlab.models.modes import eval_mode

EPS = 1e-6


def needed_moments(cfg: ModelConfig, new_cfg: ModelConfig) -> list[tuple[int, int]]:
    """The pairs ``(a, b)`` of layers whose input cross-moment ``E[x̂_a x̂_bᵀ]`` a conversion to
    ``new_cfg`` needs: every layer with itself, and each reader's old KV source with its new one."""
    pairs = {(i, i) for i in range(cfg.n_layer)}
    for r, p in enumerate(new_cfg.kv_sources):
        pairs.add((cfg.kv_sources[r], p))
    return sorted(pairs)


def _augment(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, d)`` -> the ``(n, d+1)`` rows ``(x, 1)`` of the positions ``keep`` marks (all without)."""
    x = x.detach().double().flatten(0, 1)
    if keep is not None:
        x = x[keep.flatten().to(x.device)]
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)


@torch.no_grad()
def attention_input_moments(model, batches, pairs: list[tuple[int, int]] | None = None) -> dict:
    """``E[x̂_a x̂_bᵀ]`` in float64 of the attention inputs ``x̂ = (x, 1)`` of layers ``a`` and ``b``
    at the same tokens, for each pair in ``pairs`` (default: every layer with itself), over
    ``batches``: token tensors ``(B, T)``, every row and position counting alike; or, for an
    encoder–decoder, ``(src, src_mask, tgt_in, labels)`` batches (:class:`kvlab.data.seq2seq.Seq2SeqBatches`),
    over the target positions with a label — and then also, under the key ``("cross", r)``, the
    moment of decoder layer ``r``'s cross-attention input, and under ``"memory"`` that of the
    encoder's output over the real source tokens (what cross-attention's keys and values are made of)."""
    seq2seq = model.cfg.is_encoder_decoder
    pairs = pairs if pairs is not None else [(i, i) for i in range(model.cfg.n_layer)]
    wanted = {a for pair in pairs for a in pair}
    sums: dict = {}
    count = source_count = 0
    current: dict = {}
    keep: dict[str, torch.Tensor | None] = {"tgt": None, "src": None}

    def hook(key):
        def record(module, args):
            current[key] = _augment(args[0], keep["tgt"])
        return record

    def record_memory(module, args, output):
        current["memory"] = _augment(output, keep["src"])

    hooks = [block.self_attn.register_forward_pre_hook(hook(i)) for i, block in enumerate(model.layers)
             if i in wanted]
    if seq2seq:
        hooks += [block.cross_attn.register_forward_pre_hook(hook(("cross", i)))
                  for i, block in enumerate(model.layers)]
        hooks.append(model.encoder.register_forward_hook(record_memory))
    try:
        with eval_mode(model):
            for batch in batches:
                current.clear()
                if seq2seq:
                    src, src_mask, tgt_in, labels = (t.to(model.device) for t in batch)
                    keep["tgt"], keep["src"] = labels != -100, src_mask.bool()
                    model(src, tgt_in, src_mask=src_mask)
                    for i in range(model.cfg.n_layer):
                        key = ("cross", i)
                        sums[key] = sums.get(key, 0) + current[key].T @ current[key]
                    sums["memory"] = sums.get("memory", 0) + current["memory"].T @ current["memory"]
                    count += int(keep["tgt"].sum())
                    source_count += int(keep["src"].sum())
                else:
                    model(batch.to(model.device))
                    count += batch.numel()
                for a, b in pairs:
                    sums[a, b] = sums.get((a, b), 0) + current[a].T @ current[b]
    finally:
        for h in hooks:
            h.remove()
    if not count:
        raise ConfigError("calibration needs at least one batch of tokens")
    return {key: s.cpu() / (source_count if key == "memory" else count) for key, s in sums.items()}


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


def _merge_keys(wk: list[torch.Tensor], S: torch.Tensor, q_energy: torch.Tensor,
                key_energy: torch.Tensor | None = None):
    """``wk``: the r columns' augmented key rows ``(D, d+1)``; ``q_energy (r, D/2)``: the query energy
    per column and pair; ``key_energy (r, D/2)``: each column's true key energy ``E|κ|²``, which the
    factors' magnitudes are set to keep. Returns the new rows ``(D, d+1)`` and the complex factors
    ``c (r, D/2)``."""
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
        if key_energy is not None:       # keep each column's key energy (see the module docstring)
            z_energy = (u.conj() @ gram @ u).real.clamp_min(EPS)
            fitted = c[:, j].abs().pow(2) * z_energy
            c[:, j] *= (key_energy[:, j] / fitted.clamp_min(EPS)).sqrt()
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


def _regress(S_ap: torch.Tensor, S_pp: torch.Tensor) -> torch.Tensor:
    """``E[x̂_a x̂_pᵀ] (E[x̂_p x̂_pᵀ] + λI)⁻¹``: the least-squares map from layer p's inputs to layer a's,
    so that rows ``W`` acting on ``x̂_a`` become ``W @ this`` acting on ``x̂_p`` (a small ridge keeps it
    defined for dimensions the calibration text never excites)."""
    ridge = EPS * S_pp.diagonal().mean() * torch.eye(S_pp.shape[0], dtype=S_pp.dtype)
    return torch.linalg.solve(S_pp + ridge, S_ap.T).T


def calibrated_state(model, new_cfg: ModelConfig, moments: dict[tuple[int, int], torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` converted to ``new_cfg`` (fewer KV heads and/or KV shared across
    layers) by calibrated fitting, with queries and output projections adjusted.

    Every new KV head is fitted to the old heads it replaces *as each reading layer saw them*: for
    a reader ``r`` of new producer ``p``, the old keys and values of its old source layer ``a``,
    expressed as least-squares functions of ``p``'s input (exactly themselves when ``a = p``). So
    merging layers (CLA) is merging heads after one regression; ``moments`` must hold
    :func:`needed_moments`.
    """
    cfg = model.cfg
    rope = cfg.pos == "rope"
    state = source_state(model)
    dtype = state["embed_tokens.weight"].dtype
    D, G = cfg.head_dim, cfg.q_per_kv             # query heads per old KV head
    r_heads = cfg.n_kv_head // new_cfg.n_kv_head
    old_k = {a: _augmented(state, f"layers.{a}.self_attn.k_proj") for a in cfg.kv_producers}
    old_v = {a: _augmented(state, f"layers.{a}.self_attn.v_proj") for a in cfg.kv_producers}
    for a in cfg.kv_producers:                    # producers are rebuilt below; consumers own none
        for leaf in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                state.pop(f"layers.{a}.self_attn.{leaf}.{kind}", None)
    bias = cfg.qkv_bias
    wq = {i: _augmented(state, f"layers.{i}.self_attn.q_proj") for i in range(cfg.n_layer)}
    wo = {i: state[f"layers.{i}.self_attn.o_proj.weight"].double() for i in range(cfg.n_layer)}
    for p in new_cfg.kv_producers:
        readers = [r for r, s in enumerate(new_cfg.kv_sources) if s == p]
        S_pp = moments[p, p]
        into_p = {a: _regress(moments[a, p], S_pp) for a in {cfg.kv_sources[r] for r in readers} if a != p}
        new_k, new_v = [], []
        for grp in range(new_cfg.n_kv_head):
            columns = [(r, h) for r in readers for h in range(grp * r_heads, (grp + 1) * r_heads)]
            k_rows, v_rows, q_energy, metric, k_energy = [], [], [], [], []
            q_metric = []
            for r, h in columns:
                a = cfg.kv_sources[r]
                to_p = into_p.get(a)
                k = old_k[a][h * D:(h + 1) * D]
                v = old_v[a][h * D:(h + 1) * D]
                k_rows.append(k if to_p is None else k @ to_p)
                ke = torch.einsum("ij,jk,ik->i", k, moments[a, a], k)               # E[k_row²], as seen
                k_energy.append(ke[:D // 2] + ke[D // 2:])
                v_rows.append(v if to_p is None else v @ to_p)
                energy = torch.zeros(D // 2, dtype=torch.float64)
                m = torch.zeros(D, D, dtype=torch.float64)
                qm = torch.zeros(D, D, dtype=torch.float64)
                for g in range(h * G, (h + 1) * G):
                    rows = wq[r][g * D:(g + 1) * D]
                    qq = rows @ moments[r, r] @ rows.T                               # E[q qᵀ]
                    qm += qq
                    e = qq.diagonal()                                                # E[q_row²]
                    energy += e[:D // 2] + e[D // 2:]
                    cols = wo[r][:, g * D:(g + 1) * D]
                    m += cols.T @ cols
                q_energy.append(energy)
                q_metric.append(qm)
                metric.append(m)
            v_new, blocks = _merge_values(v_rows, S_pp, metric)
            if rope:
                k_new, c = _merge_keys(k_rows, S_pp, torch.stack(q_energy), torch.stack(k_energy))
            else:           # no rotation to commute with: any D×D map per head, folded into its queries
                k_new, k_blocks = _merge_values(k_rows, S_pp, q_metric)
            new_k.append(k_new)
            new_v.append(v_new)
            for n, (r, h) in enumerate(columns):
                for g in range(h * G, (h + 1) * G):
                    rows = wq[r][g * D:(g + 1) * D]
                    wq[r][g * D:(g + 1) * D] = _rotate_query_rows(rows, c[n].conj()) if rope else k_blocks[n].T @ rows
                    wo[r][:, g * D:(g + 1) * D] = wo[r][:, g * D:(g + 1) * D] @ blocks[n]
        _store(state, f"layers.{p}.self_attn.k_proj", torch.cat(new_k), dtype, bias)
        _store(state, f"layers.{p}.self_attn.v_proj", torch.cat(new_v), dtype, bias)
    for i in range(cfg.n_layer):
        _store(state, f"layers.{i}.self_attn.q_proj", wq[i], dtype, bias)
        state[f"layers.{i}.self_attn.o_proj.weight"] = wo[i].to(dtype)
    if cfg.is_encoder_decoder:
        _cross_state(state, cfg, new_cfg, moments)
    return state


def _cross_state(state: dict, cfg: ModelConfig, new_cfg: ModelConfig, moments: dict) -> None:
    """An encoder–decoder's cross-attention merged the same way, in place: the keys and values of every
    decoder layer are linear in the one encoder output (its moment ``moments["memory"]``), so heads and
    layers merge alike — no regression between layers — and, with no RoPE on them, each old head's keys
    are any ``D×D`` map of the shared ones (weighted by its queries' ``E[q qᵀ]`` at that layer's
    cross-attention input), folded into its queries, as its values' map is folded into ``o_proj``."""
    D, bias = cfg.head_dim, cfg.qkv_bias
    dtype = state["embed_tokens.weight"].dtype
    G = cfg.n_head // cfg.cross_n_kv_head
    r_heads = cfg.cross_n_kv_head // new_cfg.cross_n_kv_head
    S = moments["memory"]
    pre = "layers.{}.cross_attn.{}"
    old_k = {a: _augmented(state, pre.format(a, "k_proj")) for a in cfg.cross_kv_producers}
    old_v = {a: _augmented(state, pre.format(a, "v_proj")) for a in cfg.cross_kv_producers}
    for a in cfg.cross_kv_producers:
        for leaf in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                state.pop(f"{pre.format(a, leaf)}.{kind}", None)
    wq = {i: _augmented(state, pre.format(i, "q_proj")) for i in range(cfg.n_layer)}
    wo = {i: state[f"{pre.format(i, 'o_proj')}.weight"].double() for i in range(cfg.n_layer)}
    for p in new_cfg.cross_kv_producers:
        readers = [r for r, s in enumerate(new_cfg.cross_kv_sources) if s == p]
        new_k, new_v = [], []
        for grp in range(new_cfg.cross_n_kv_head):
            columns = [(r, h) for r in readers for h in range(grp * r_heads, (grp + 1) * r_heads)]
            k_rows, v_rows, q_metric, o_metric = [], [], [], []
            for r, h in columns:
                a = cfg.cross_kv_sources[r]
                k_rows.append(old_k[a][h * D:(h + 1) * D])
                v_rows.append(old_v[a][h * D:(h + 1) * D])
                qm = torch.zeros(D, D, dtype=torch.float64)
                om = torch.zeros(D, D, dtype=torch.float64)
                for g in range(h * G, (h + 1) * G):
                    rows = wq[r][g * D:(g + 1) * D]
                    qm += rows @ moments["cross", r] @ rows.T
                    cols = wo[r][:, g * D:(g + 1) * D]
                    om += cols.T @ cols
                q_metric.append(qm)
                o_metric.append(om)
            k_new, k_blocks = _merge_values(k_rows, S, q_metric)
            v_new, v_blocks = _merge_values(v_rows, S, o_metric)
            new_k.append(k_new)
            new_v.append(v_new)
            for n, (r, h) in enumerate(columns):
                for g in range(h * G, (h + 1) * G):
                    wq[r][g * D:(g + 1) * D] = k_blocks[n].T @ wq[r][g * D:(g + 1) * D]
                    wo[r][:, g * D:(g + 1) * D] = wo[r][:, g * D:(g + 1) * D] @ v_blocks[n]
        _store(state, pre.format(p, "k_proj"), torch.cat(new_k), dtype, bias)
        _store(state, pre.format(p, "v_proj"), torch.cat(new_v), dtype, bias)
    for i in range(cfg.n_layer):
        _store(state, pre.format(i, "q_proj"), wq[i], dtype, bias)
        state[f"{pre.format(i, 'o_proj')}.weight"] = wo[i].to(dtype)


def _store(state: dict, prefix: str, aug: torch.Tensor, dtype: torch.dtype, bias: bool) -> None:
    state[f"{prefix}.weight"] = aug[:, :-1].to(dtype).contiguous()
    if bias:
        state[f"{prefix}.bias"] = aug[:, -1].to(dtype).contiguous()

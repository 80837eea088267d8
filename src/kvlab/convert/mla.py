"""Conversion of a GQA/MHA model to multi-head latent attention (the ``mla`` kind) at any latent
width, from calibration activations (cf. MHA2MLA, Ji et al. 2025; TransMLA, Meng et al. 2025).

The cache of a converted layer is ``kv_lora_rank + qk_rope_head_dim`` channels per token, so the
KV budget is continuous (any latent width), not a divisor of the head count.

**Which channels keep RoPE** (partial RoPE). An MLA layer has one RoPE key shared by all heads, of
``R = qk_rope_head_dim`` channels whose frequencies follow from ``R`` and ``rope_theta``:
``θ_i = theta'^(-2i/R)``. With ``theta' = theta^(R/D)`` these are exactly the original head's ``R/2``
*fastest* frequencies (MHA2MLA's "high-frequency" choice), so the converted model keeps the
positional channels that rotate fastest — those that cannot lose their rotation — and stays loadable
by transformers' DeepSeek-V3. Those pairs keep RoPE: across the KV heads, each pair's complex keys
are fitted by one shared complex key and per-head complex factors that the queries absorb (the
RoPE-commuting rank-1 fit of :mod:`kvlab.convert.calibrated`, weighted by query energy). The slower
pairs lose their rotation (they become position-free "nope" channels): a small error where
``θ·distance`` stays small, which training then recovers.

**The latent.** The position-free key channels of every KV head and every value head are stacked
and compressed jointly into ``kv_lora_rank`` channels by PCA of their calibration activations
(``method="pca"``), keys and values balanced to equal total energy, since a layer's key and value
errors are in different units (TransMLA balances K and V norms for the same reason).
``method="whitened"`` weights each part by what the model does with it — keys by the second moment
of the queries that meet them (the error in a score is ``qᵀ·δk``), values by ``W_oᵀW_o`` of the heads
that read them (the error that reaches the residual stream). Measured on SmolLM2 at α = 0 (KV/2,
R = 32) the two are within 3 % of each other (perplexity 28.5 pca, 29.2 whitened). ``method="fisher"``
measures the error by what it does to the loss instead, as the low-rank fit does
(:mod:`kvlab.convert.lowrank`): ``M = E[g gᵀ]`` of the loss's gradient with respect to the keys
(before RoPE, the position-free channels of every head with their cross-head terms) and the values,
one currency for both, so no balancing is needed (and the latent is brought to the RoPE key's RMS, so
that a quantized cache rounds both alike). ``kv_a_proj_with_mqa`` computes the latent and the shared
RoPE key; ``kv_b_proj`` maps the latent back to each query head's key and value (heads of one old
group get the same rows).

``latent_norm=True`` adds DeepSeek's RMSNorm on the latent (needed for a transformers export); its
weight starts at the latents' calibration RMS, so the norm only removes per-token scale.
"""

from __future__ import annotations

import torch

from kvlab.attention.mla import MLAShape
from kvlab.config.model import ModelConfig
from kvlab.convert.calibrated import EPS, _augmented, _merge_keys, _rotate_query_rows, _store, _sym_power
from kvlab.convert.finish import finish_conversion, source_state
from kvlab.convert.lowrank import _metric_roots, kv_loss_moments
from kvlab.errors import ConfigError

MLA_METHODS = ("pca", "whitened", "fisher")


def plan_mla(cfg: ModelConfig, *, kv_lora_rank: int, qk_rope_head_dim: int | None = None,
             latent_norm: bool = False, method: str = "pca") -> ModelConfig:
    """The config of ``cfg`` converted to MLA, or a :class:`ConfigError` naming the fix."""
    kinds = sorted({s.kind for s in cfg.layer_specs} - {"gqa"})
    if kinds:
        raise ConfigError(f"conversion to MLA starts from 'gqa' layers; this model has layers of kind(s) {kinds}")
    if method not in MLA_METHODS:
        raise ConfigError(f"MLA conversion method {method!r} is not one of {list(MLA_METHODS)}")
    if cfg.pos != "rope":
        raise ConfigError("conversion to MLA moves RoPE into a shared key; the model needs pos='rope'")
    if cfg.n_kv_layers != cfg.n_layer:
        raise ConfigError("conversion to MLA starts from a model without cross-layer sharing (every layer its own "
                          "K/V); convert the original model")
    D = cfg.head_dim
    R = qk_rope_head_dim if qk_rope_head_dim is not None else D // 2
    if not isinstance(R, int) or R < 2 or R > D or R % 2:
        raise ConfigError(f"qk_rope_head_dim={R!r} must be an even number of channels in [2, head_dim={D}]")
    most = cfg.n_kv_head * (2 * D - R)
    if not isinstance(kv_lora_rank, int) or not 1 <= kv_lora_rank <= most:
        raise ConfigError(f"kv_lora_rank={kv_lora_rank!r} must be in [1, {most}] (the position-free key and value "
                          f"channels it compresses)")
    # theta^(R/D): the RoPE key's R/2 frequencies are the original's fastest R/2 (module docstring).
    shape = MLAShape(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=R, qk_nope_head_dim=D - R, v_head_dim=D,
                     q_lora_rank=None, latent_norm=latent_norm)
    return cfg.replace(attn_kind="mla", attention_layers=None, n_kv_head=cfg.n_head,
                       rope_theta=cfg.rope_theta ** (R / D),
                       attn_options={**(cfg.attn_options or {}), **shape.options()})


def _pair_rows(pairs, D: int) -> list[int]:
    """A head's rows for these RoPE pairs, half layout: the real parts, then the imaginary parts."""
    return list(pairs) + [D // 2 + j for j in pairs]


def _power(m: torch.Tensor, power: float) -> torch.Tensor:
    return m if m.numel() == 0 else _sym_power(m, power)     # no position-free key channels when R = D


def _latent_metric(method: str, raw: torch.Tensor, S: torch.Tensor, wq: torch.Tensor, wo: torch.Tensor, heads,
                   nope_rows: list[int], D: int, Fk: torch.Tensor | None, Fv: torch.Tensor | None):
    """``(M^{1/2}, M^{-1/2})`` of the latent's metric over the stacked rows ``raw`` (per KV head g: its
    position-free key rows, then its value rows), for ``method``:

    - ``pca``: keys scaled to the values' total energy (one factor for every key row);
    - ``whitened``: per head, keys by their queries' second moment, values by ``W_oᵀW_o``, then
      balanced as ``pca`` balances them;
    - ``fisher``: the loss's own metric, ``E[g gᵀ]`` of its gradient with respect to the keys (before
      RoPE; the position-free rows of every head, cross-head terms kept) and to the values, damped as
      the low-rank fit damps it; no balance is needed, since both are in units of loss.
    """
    n_kv, nk = len(heads), len(nope_rows)
    width = nk + D
    key_rows = torch.tensor([g * width + r for g in range(n_kv) for r in range(nk)], dtype=torch.long)
    value_rows = torch.tensor([g * width + nk + c for g in range(n_kv) for c in range(D)], dtype=torch.long)
    if method == "fisher":
        if Fk is None or Fv is None:
            raise ConfigError("the fisher MLA fit needs the loss's gradient moments of the keys and values "
                              "(kvlab.convert.lowrank.kv_loss_moments)")
        channels = torch.tensor([g * D + r for g in range(n_kv) for r in nope_rows], dtype=torch.long)
        M = torch.zeros(len(raw), len(raw), dtype=torch.float64)
        M[key_rows.unsqueeze(1), key_rows] = Fk.double()[channels.unsqueeze(1), channels]
        M[value_rows.unsqueeze(1), value_rows] = Fv.double()
        return _metric_roots(M)
    root = torch.eye(len(raw), dtype=torch.float64)
    inv = root.clone()
    if method == "whitened":
        for g in range(n_kv):
            mq = sum(wq[h * D:(h + 1) * D][nope_rows] @ S @ wq[h * D:(h + 1) * D][nope_rows].T for h in heads[g])
            mv = sum(wo[:, h * D:(h + 1) * D].T @ wo[:, h * D:(h + 1) * D] for h in heads[g])
            for rows, m in ((slice(g * width, g * width + nk), mq), (slice(g * width + nk, (g + 1) * width), mv)):
                root[rows, rows], inv[rows, rows] = _power(m, 0.5), _power(m, -0.5)
    weighted = root @ raw
    keys, values = weighted[key_rows], weighted[value_rows]
    k_energy = torch.einsum("ij,jk,ik->", keys, S, keys)
    v_energy = torch.einsum("ij,jk,ik->", values, S, values)
    balance = (v_energy / k_energy.clamp_min(EPS)).sqrt() if k_energy > 0 else torch.tensor(1.0, dtype=torch.float64)
    root[key_rows] *= balance
    inv[:, key_rows] /= balance
    return root, inv


def mla_state(model, new_cfg: ModelConfig, moments: dict[tuple[int, int], torch.Tensor],
              method: str = "pca", loss_moments: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` converted to the MLA config ``new_cfg`` (from :func:`plan_mla`);
    ``moments`` holds ``E[x̂ x̂ᵀ]`` of every layer's attention input (``attention_input_moments``),
    ``loss_moments`` the loss's gradient moments (:func:`kv_loss_moments`, for ``fisher``)."""
    cfg = model.cfg
    state = source_state(model)
    for i in range(cfg.n_layer):
        F = {leaf: loss_moments[i, leaf] for leaf in ("k", "v")} if loss_moments is not None else None
        mla_layer_state(state, cfg, new_cfg, i, moments[i, i], method, F)
    return state


def mla_layer_state(state: dict[str, torch.Tensor], cfg: ModelConfig, new_cfg: ModelConfig, i: int,
                    S: torch.Tensor, method: str = "pca", F: dict[str, torch.Tensor] | None = None) -> None:
    """Convert layer ``i`` of ``state`` (a GQA state dict of config ``cfg``) to ``new_cfg``'s MLA in
    place, from ``S = E[x̂ x̂ᵀ]`` of the inputs the converted layer will see (and for ``fisher``
    ``F``: the loss's gradient moments of its keys, "k", and values, "v": :func:`kv_loss_moments`)."""
    F = F or {}
    D, G, n_kv = cfg.head_dim, cfg.q_per_kv, cfg.n_kv_head
    shape = MLAShape.of(new_cfg, i)
    R, rank = shape.qk_rope_head_dim, shape.kv_lora_rank
    rope_rows = _pair_rows(range(R // 2), D)                    # the fastest pairs keep RoPE
    nope_rows = _pair_rows(range(R // 2, D // 2), D)
    dtype = state["embed_tokens.weight"].dtype
    prefix = f"layers.{i}.self_attn"
    wk, wv, wq = (_augmented(state, f"{prefix}.{leaf}") for leaf in ("k_proj", "v_proj", "q_proj"))
    wo = state[f"{prefix}.o_proj.weight"].double()
    for leaf in ("k_proj", "v_proj", "q_proj"):
        for part in ("weight", "bias"):
            state.pop(f"{prefix}.{leaf}.{part}", None)
    heads = [range(g * G, (g + 1) * G) for g in range(n_kv)]   # the query heads reading KV head g

    def energy(rows: torch.Tensor, S: torch.Tensor = S) -> torch.Tensor:   # E[row²] per pair, re + im
        e = torch.einsum("ij,jk,ik->i", rows, S, rows)
        return e[:len(e) // 2] + e[len(e) // 2:]

    # The shared RoPE key: per kept pair, the rank-1 complex fit across KV heads.
    k_rope = [wk[g * D:(g + 1) * D][rope_rows] for g in range(n_kv)]
    q_energy = torch.stack([sum(energy(wq[h * D:(h + 1) * D][rope_rows]) for h in heads[g]) for g in range(n_kv)])
    rope_key, factors = _merge_keys(k_rope, S, q_energy, torch.stack([energy(k) for k in k_rope]))
    # The latent: joint PCA of the position-free keys and the values of every KV head, in a metric M
    # that puts keys and values in common units: the fit keeps the top eigenvectors P of
    # M^{1/2} W S Wᵀ M^{1/2} (W: the stacked rows), caches Pᵀ M^{1/2} W and rebuilds with M^{-1/2} P.
    raw = torch.cat([torch.cat([wk[g * D:(g + 1) * D][nope_rows], wv[g * D:(g + 1) * D]]) for g in range(n_kv)])
    root, inv_root = _latent_metric(method, raw, S, wq, wo, heads, nope_rows, D, F.get("k"), F.get("v"))
    vals, vecs = torch.linalg.eigh(root @ raw @ S @ raw.T @ root.T)
    P = vecs[:, -rank:].flip(1)                                          # top principal directions
    latent = P.T @ root @ raw                                            # (rank, d+1)
    rebuild = inv_root @ P                                               # (stacked rows, rank)
    if method == "fisher":
        # The loss's metric gives the latent arbitrary units (its scale follows the gradient's), which a
        # cache stored in fp8 (no scale) or in int groups shared with the RoPE key would round badly:
        # bring it to the RoPE key's RMS, the rebuild taking the inverse (the model is unchanged).
        rms = lambda w: (torch.einsum("ij,jk,ik->", w, S, w) / len(w)).sqrt()     # noqa: E731
        unit = (rms(rope_key) / rms(latent).clamp_min(EPS)).clamp_min(EPS)
        latent, rebuild = latent * unit, rebuild / unit
    if shape.latent_norm:       # DeepSeek's norm on the latent, starting at the latents' RMS
        rms = (torch.einsum("ij,jk,ik->", latent, S, latent) / rank).sqrt().clamp_min(EPS)
        state[f"{prefix}.kv_a_layernorm.weight"] = torch.full((rank,), float(rms), dtype=dtype)
    _store(state, f"{prefix}.kv_a_proj_with_mqa", torch.cat([latent, rope_key]), dtype, cfg.qkv_bias)
    width = len(nope_rows) + D
    up, queries = [], []
    for g in range(n_kv):
        block = rebuild[g * width:(g + 1) * width]
        for h in heads[g]:
            up.append(block)
            q = wq[h * D:(h + 1) * D]
            queries += [q[nope_rows], _rotate_query_rows(q[rope_rows], factors[g].conj())]
    state[f"{prefix}.kv_b_proj.weight"] = torch.cat(up).to(dtype).contiguous()
    _store(state, f"{prefix}.q_proj", torch.cat(queries), dtype, cfg.qkv_bias)


def convert_to_mla(model, *, kv_lora_rank: int, qk_rope_head_dim: int | None = None, method: str = "pca",
                   latent_norm: bool = False, calibration=None, moments: dict | None = None,
                   loss_moments: dict | None = None):
    """A new model whose every layer is MLA with a latent of ``kv_lora_rank`` channels and a shared
    RoPE key of ``qk_rope_head_dim`` (default head_dim/2), fitted on ``calibration`` token batches
    ``(B, T)`` run through ``model`` (``moments``: their per-layer ``attention_input_moments``, and for
    ``method="fisher"`` ``loss_moments``: :func:`kv_loss_moments`, if computed already). Everything but
    the attention's projections is copied."""
    from kvlab.convert.calibrated import attention_input_moments

    cfg = model.cfg
    new_cfg = plan_mla(cfg, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
                       latent_norm=latent_norm, method=method)
    if calibration is None:
        raise ConfigError("conversion to MLA needs calibration token batches (calibration=[tokens, ...])")
    calibration = list(calibration)
    if moments is None:
        moments = attention_input_moments(model, calibration)
    if method == "fisher" and loss_moments is None:
        loss_moments = kv_loss_moments(model, calibration)
    state = mla_state(model, new_cfg, moments, method, loss_moments if method == "fisher" else None)
    step = dict(method=method, to="mla", kv_lora_rank=kv_lora_rank,
                qk_rope_head_dim=MLAShape.of(new_cfg).qk_rope_head_dim,
                latent_norm=latent_norm, calibration_tokens=sum(int(t.numel()) for t in calibration),
                kv_bytes_per_token_bf16=[cfg.kv_bytes_per_token("bf16"), new_cfg.kv_bytes_per_token("bf16")])
    return finish_conversion(model, new_cfg, state, step)

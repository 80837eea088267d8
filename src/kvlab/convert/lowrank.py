"""Conversion of a GQA/MHA model to a low-rank K/V cache (the ``lowrank`` kind, Palu) at any key and
value latent widths, from calibration activations.

Each producer layer's keys (before RoPE) and values are replaced by their best rank-``k_rank`` and
rank-``v_rank`` approximations on the calibration text: with ``C = W S Wᵀ`` the second moment of the
layer's keys (``S = E[x̂ x̂ᵀ]`` of its augmented inputs, ``W = [W_k | b_k]``), the top ``k_rank``
eigenvectors ``U`` of ``C`` give ``k_down = Uᵀ W`` (the cached latent) and ``k_up = U`` (the rebuild),
which minimises the expected squared error of the rebuilt keys ``E‖k − U Uᵀ k‖²`` — PCA without
centring, since there is nothing to add the mean back with. Values likewise. RoPE is applied to the
rebuilt keys (:mod:`kvlab.attention.lowrank`), so unlike the MLA conversion no channel loses its
rotation; at full rank the converted model computes the original's logits exactly.

How to split a budget between keys and values is the caller's choice: keys are lower-rank than values
in trained models (SmolLM2: rank 64 of 192 keeps 97–99.9 % of the key energy but 79–95 % of the value
energy), and at α = 0 on SmolLM2 at half the KV a third for the keys scores 13.9 against 16.1 for an
even split (``kvlab shrink`` ranks the splits).
"""

from __future__ import annotations

import torch

from kvlab.config.model import ModelConfig
from kvlab.convert.calibrated import _augmented, _store
from kvlab.errors import ConfigError


def plan_lowrank(cfg: ModelConfig, *, k_rank: int, v_rank: int) -> ModelConfig:
    """The config of ``cfg`` converted to low-rank K/V, or a :class:`ConfigError` naming the fix."""
    kinds = sorted({s.kind for s in cfg.layer_specs} - {"gqa"})
    if kinds:
        raise ConfigError(f"conversion to low-rank K/V starts from 'gqa' layers; this model has layers of kind(s) "
                          f"{kinds}")
    width = cfg.n_kv_head * cfg.head_dim
    for name, rank in (("k_rank", k_rank), ("v_rank", v_rank)):
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= width:
            raise ConfigError(f"{name}={rank!r} must be in [1, {width}] (n_kv_head x head_dim, the channels it "
                              f"compresses)")
    specs = None if cfg.attention_layers is None else [{"kind": "lowrank", **s.options} for s in cfg.layer_specs]
    return cfg.replace(attn_kind="lowrank", attention_layers=specs, k_rank=k_rank, v_rank=v_rank)


def _principal(w: torch.Tensor, S: torch.Tensor, rank: int) -> torch.Tensor:
    """The top ``rank`` eigenvectors ``(rows, rank)`` of the outputs' second moment ``w S wᵀ``."""
    _, vecs = torch.linalg.eigh(w @ S @ w.T)
    return vecs[:, -rank:].flip(1)


def lowrank_state(model, new_cfg: ModelConfig, moments: dict[tuple[int, int], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` converted to the lowrank config ``new_cfg`` (from
    :func:`plan_lowrank`); ``moments`` holds ``E[x̂ x̂ᵀ]`` of every producer's attention input."""
    cfg = model.cfg
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not (cfg.tie_embeddings and k == "lm_head.weight")}
    dtype = state["embed_tokens.weight"].dtype
    for i in cfg.kv_producers:
        prefix = f"layers.{i}.self_attn"
        for leaf, rank in (("k", new_cfg.k_rank), ("v", new_cfg.v_rank)):
            w = _augmented(state, f"{prefix}.{leaf}_proj")
            U = _principal(w, moments[i, i], rank)
            for part in ("weight", "bias"):
                state.pop(f"{prefix}.{leaf}_proj.{part}", None)
            _store(state, f"{prefix}.{leaf}_down", U.T @ w, dtype, cfg.qkv_bias)
            state[f"{prefix}.{leaf}_up.weight"] = U.to(dtype).contiguous()
    return state


def convert_to_lowrank(model, *, k_rank: int, v_rank: int, calibration=None, moments: dict | None = None):
    """A new model whose producer layers cache key and value latents of ``k_rank`` and ``v_rank``
    channels, fitted by PCA of their keys and values on ``calibration`` token batches ``(B, T)`` run
    through ``model`` (``moments``: their per-layer ``attention_input_moments``, if computed already).
    Everything else is copied; queries and output projections are unchanged."""
    from kvlab.convert.calibrated import attention_input_moments
    from kvlab.convert.heads import finish_conversion

    cfg = model.cfg
    new_cfg = plan_lowrank(cfg, k_rank=k_rank, v_rank=v_rank)
    if calibration is None and moments is None:
        raise ConfigError("conversion to low-rank K/V needs calibration token batches (calibration=[tokens, ...])")
    calibration = list(calibration or [])
    if moments is None:
        moments = attention_input_moments(model, calibration, [(i, i) for i in cfg.kv_producers])
    state = lowrank_state(model, new_cfg, moments)
    step = dict(method="pca", to="lowrank", k_rank=k_rank, v_rank=v_rank,
                calibration_tokens=sum(int(t.numel()) for t in calibration),
                kv_bytes_per_token_bf16=[cfg.kv_bytes_per_token("bf16"), new_cfg.kv_bytes_per_token("bf16")])
    return finish_conversion(model, new_cfg, state, step)

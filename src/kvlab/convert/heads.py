"""Checkpoint conversion to fewer KV heads (GQA/MQA) and to Cross-Layer Attention — step 1 of
uptraining (the GQA paper, Ainslie et al. 2023; the CLA paper, Brandon et al. 2024).

Methods, for both kinds of sharing:
- ``mean``: the new K/V projection of a group is the mean of the projections it replaces
  (weights and biases) — the GQA paper's choice;
- ``first``: keep the group's first head (or first layer);
- ``random``: a fresh projection, initialised as kvlab initialises new models (the ablation);
- ``calibrated``: fitted on calibration activations, RoPE-aware, with the queries and output
  projection absorbing what the shared head cannot carry (:mod:`kvlab.convert.calibrated`).

An encoder–decoder's decoder converts the same way, its cross-attention too (``cross_n_kv_head``,
``cross_cla``: every decoder layer reads the same encoder output, so sharing its K/V across layers
is natural), exactly as the GQA paper converted T5; the encoder's self-attention stays MHA (it is
never cached).

KV heads are pooled over contiguous groups (new KV head ``j`` replaces old heads
``j·r … j·r + r - 1``), matching contiguous query grouping, so query head ``h`` keeps reading
(a pool of) the heads it read before. RoPE is linear and position-wise, so pooling projections
before rotation equals pooling rotated keys.
"""

from __future__ import annotations

import torch

from kvlab.config.model import ModelConfig
from kvlab.convert.calibrated import attention_input_moments, calibrated_state, needed_moments
from kvlab.convert.finish import finish_conversion, source_state
from kvlab.errors import ConfigError
from kvlab.models.decoder import Transformer

METHODS = ("mean", "first", "random", "calibrated")


def _pool(tensors: list[torch.Tensor], method: str, generator: torch.Generator, std: float) -> torch.Tensor:
    """Combine same-shaped tensors by ``method`` (float64 mean, cast back)."""
    if method == "mean":
        return torch.stack([t.double() for t in tensors]).mean(0).to(tensors[0].dtype)
    if method == "first":
        return tensors[0].clone()
    if tensors[0].dim() == 1:                                   # a fresh bias starts at zero
        return torch.zeros_like(tensors[0])
    return (torch.randn(tensors[0].shape, generator=generator, dtype=torch.float64) * std).to(tensors[0].dtype)


def pool_kv_heads(weight: torch.Tensor, n_kv_old: int, n_kv_new: int, method: str,
                  generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """``(n_kv_old·D, ...)`` K or V projection rows -> ``(n_kv_new·D, ...)`` by contiguous groups."""
    per = n_kv_old // n_kv_new
    heads = weight.reshape(n_kv_old, -1, *weight.shape[1:])       # (H_old, D, ...)
    groups = [_pool([heads[g * per + i] for i in range(per)], method, generator, std) for g in range(n_kv_new)]
    return torch.stack(groups).reshape(n_kv_new * heads.shape[1], *weight.shape[1:])


def plan_conversion(cfg: ModelConfig, *, n_kv_head: int | None = None, cla: int | None = None,
                    kv_source: list[int] | None = None, method: str = "mean", cross_n_kv_head: int | None = None,
                    cross_cla: int | None = None) -> ModelConfig:
    """The config a conversion produces, or a :class:`ConfigError` — without touching weights, so
    callers can reject a conversion before loading a checkpoint."""
    kinds = sorted({s.kind for s in cfg.layer_specs} - {"gqa"})
    if kinds:
        raise ConfigError(f"K/V head pooling and CLA conversion work on the 'gqa' kind; this model has layers of "
                          f"kind(s) {kinds}")
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not one of {list(METHODS)}")
    cross = cross_n_kv_head is not None or cross_cla is not None
    if cross and not cfg.is_encoder_decoder:
        raise ConfigError("cross_n_kv_head / cross_cla convert an encoder–decoder's cross-attention; this model is "
                          "decoder-only")
    if n_kv_head is None and cla is None and kv_source is None and not cross:
        raise ConfigError("nothing to convert: give n_kv_head (--kv-heads/--mqa) and/or cla / kv_source"
                          + (" / cross_n_kv_head / cross_cla" if cfg.is_encoder_decoder else ""))
    new_heads = cfg.n_kv_head if n_kv_head is None else n_kv_head
    if not isinstance(new_heads, int) or new_heads < 1 or cfg.n_kv_head % new_heads:
        divisors = [d for d in range(1, cfg.n_kv_head + 1) if cfg.n_kv_head % d == 0]
        raise ConfigError(f"cannot pool n_kv_head={cfg.n_kv_head} into {new_heads!r} KV heads: groups of existing "
                          f"heads are averaged, so the new count must divide {cfg.n_kv_head} (one of {divisors})")
    wiring: dict = {}
    if cla is not None:
        wiring = {"cla": cla}
    if kv_source is not None:
        wiring = {"kv_source": kv_source}
    if cross_n_kv_head is not None:
        old = cfg.cross_n_kv_head
        if not isinstance(cross_n_kv_head, int) or cross_n_kv_head < 1 or old % cross_n_kv_head:
            divisors = [d for d in range(1, old + 1) if old % d == 0]
            raise ConfigError(f"cannot pool cross_n_kv_head={old} into {cross_n_kv_head!r} KV heads: the new count "
                              f"must divide {old} (one of {divisors})")
        wiring["cross_n_kv_head"] = cross_n_kv_head
    if cross_cla is not None:
        if cfg.cross_cla != 1 and cross_cla % cfg.cross_cla:
            raise ConfigError(f"cross_cla={cross_cla} does not group the current cross_cla={cfg.cross_cla} layers; "
                              f"use a multiple of {cfg.cross_cla}")
        wiring["cross_cla"] = cross_cla
    return cfg.replace(n_kv_head=new_heads, **wiring)


def convert(model: Transformer, *, n_kv_head: int | None = None, cla: int | None = None,
            kv_source: list[int] | None = None, method: str = "mean", seed: int = 0,
            calibration=None, moments: dict | None = None, cross_n_kv_head: int | None = None,
            cross_cla: int | None = None) -> Transformer:
    """A new model with ``n_kv_head`` KV heads and/or KV shared across layers (``cla`` or an
    explicit ``kv_source``); for an encoder–decoder also its cross-attention's (``cross_n_kv_head``,
    ``cross_cla``). Everything else is copied; the provenance gets a step.
    ``calibration`` (``method="calibrated"``): token batches ``(B, T)`` run through ``model``;
    ``moments``: their :func:`attention_input_moments` computed already (with :func:`needed_moments`'s
    pairs), for callers that convert one model many ways."""
    cfg = model.cfg
    new_cfg = plan_conversion(cfg, n_kv_head=n_kv_head, cla=cla, kv_source=kv_source, method=method,
                              cross_n_kv_head=cross_n_kv_head, cross_cla=cross_cla)
    new_heads = new_cfg.n_kv_head
    old_src = cfg.kv_sources
    step = dict(method=method, seed=seed, n_kv_head=[cfg.n_kv_head, new_heads],
                kv_sources=[old_src, new_cfg.kv_sources],
                kv_bytes_per_token_bf16=[cfg.kv_bytes_per_token("bf16"), new_cfg.kv_bytes_per_token("bf16")])
    if cfg.is_encoder_decoder:
        step.update(cross_n_kv_head=[cfg.cross_n_kv_head, new_cfg.cross_n_kv_head],
                    cross_kv_sources=[cfg.cross_kv_sources, new_cfg.cross_kv_sources],
                    cross_bytes_per_source_token_bf16=[cfg.cache_bytes("bf16").per_source_token,
                                                       new_cfg.cache_bytes("bf16").per_source_token])
    if method == "calibrated":
        if calibration is None:
            raise ConfigError("method='calibrated' needs calibration token batches (calibration=[tokens, ...])")
        calibration = list(calibration)
        if moments is None:
            moments = attention_input_moments(model, calibration, needed_moments(cfg, new_cfg))
        state = calibrated_state(model, new_cfg, moments)
        step["calibration_tokens"] = sum(_calibration_tokens(b) for b in calibration)
        if cla is not None:
            step["cla"] = cla
        return finish_conversion(model, new_cfg, state, step)
    gen = torch.Generator().manual_seed(seed)
    std = 0.02   # the init scale of a new kvlab model (Transformer.reset_parameters)
    state = source_state(model)
    _pool_layers(state, "self_attn", old_src, new_cfg.kv_sources, cfg.n_kv_head, new_heads, method, gen, std)
    if cfg.is_encoder_decoder:
        _pool_layers(state, "cross_attn", cfg.cross_kv_sources, new_cfg.cross_kv_sources, cfg.cross_n_kv_head,
                     new_cfg.cross_n_kv_head, method, gen, std)
    if cla is not None:
        step["cla"] = cla
    return finish_conversion(model, new_cfg, state, step)


def _calibration_tokens(batch) -> int:
    """Tokens a calibration batch holds: a token tensor's, or an encoder–decoder batch's real source
    and target tokens."""
    if isinstance(batch, torch.Tensor):
        return int(batch.numel())
    src, src_mask, tgt_in, labels = batch
    return int(src_mask.sum()) + int((labels != -100).sum())


def _pool_layers(state: dict, attn: str, old_sources: list[int], new_sources: list[int], old_heads: int,
                 new_heads: int, method: str, gen: torch.Generator, std: float) -> None:
    """Replace the decoder layers' ``attn`` K/V projections in ``state`` by those of the new wiring:
    each new producer's pools (heads within each layer first, then across the layers that now read
    it) what its readers read before. Encoder layers (``encoder.layers.*``) are left alone."""
    kv_keys = [k for k in state if k.startswith("layers.") and (f".{attn}.k_proj." in k or f".{attn}.v_proj." in k)]
    old = {k: state.pop(k) for k in kv_keys}

    def effective(layer: int, leaf: str) -> torch.Tensor | None:
        """Layer ``layer``'s K/V projection in the old model (a consumer's is its producer's)."""
        return old.get(f"layers.{old_sources[layer]}.{attn}.{leaf}")

    for p in sorted(set(new_sources)):
        group = [i for i, s in enumerate(new_sources) if s == p]
        for leaf in ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"):
            if effective(p, leaf) is None:
                continue
            per_layer = [pool_kv_heads(effective(i, leaf), old_heads, new_heads, method, gen, std) for i in group]
            state[f"layers.{p}.{attn}.{leaf}"] = _pool(per_layer, method, gen, std)

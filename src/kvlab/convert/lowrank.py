"""Conversion of a GQA/MHA model to a low-rank K/V cache (the ``lowrank`` kind, Palu) at any key and
value latent widths, from calibration activations.

Each producer layer's keys (before RoPE) and values are replaced by rank-``k_rank`` and
rank-``v_rank`` approximations fitted on calibration text. Two ways to fit them (``method``):

- ``pca``: with ``C = W S Wᵀ`` the second moment of the layer's keys (``S = E[x̂ x̂ᵀ]`` of its
  augmented inputs, ``W = [W_k | b_k]``), the top ``k_rank`` eigenvectors ``U`` of ``C`` give
  ``k_down = Uᵀ W`` (the cached latent) and ``k_up = U`` (the rebuild), which minimises the expected
  squared error of the rebuilt keys ``E‖k − U Uᵀ k‖²`` — PCA without centring, since there is nothing
  to add the mean back with. Values likewise.
- ``fisher``: the error is measured by what it does to the loss instead. With ``F = E[g gᵀ]`` the
  second moment of the language-model loss's gradient with respect to the layer's keys (before
  RoPE: the gradient runs back through the rotation, so positions are accounted for) or values, a
  change ``δ`` costs about ``½ δᵀ F δ`` (the empirical Fisher; Fisher-weighted SVD, Hsu et al. 2022,
  applied to activations as SVD-LLM and Palu apply their whitening). The best rank-r fit in that
  metric is PCA of ``F^{1/2} C F^{1/2}``: top eigenvectors ``U`` give ``k_down = Uᵀ F^{1/2} W`` and
  ``k_up = F^{-1/2} U``. ``F`` is damped by a tenth of its mean eigenvalue (``DAMPING``), since a
  few thousand tokens leave some directions without gradient, and an estimate of zero there would
  let the rebuild put anything in them.

The ``fisher`` eigenvalues are estimated loss increases in one currency for every layer, keys and
values alike, so they also decide **how to split a budget**: :func:`allocate_ranks` gives each of
the ``2 × n_kv_layers`` latents the ranks whose dropped components would cost the most, which
leaves the keys of some layers a tenth of the channels and the values of others nearly all. Measured
on SmolLM2-135M at α = 0 (``kvlab shrink``'s proxy perplexity, original 9.38; BENCHMARKS "kvlab
shrink"): at half the KV the best uniform split by ``pca`` scores 12.11 and the allocation 10.54; at a
third 14.01 and 12.93.

RoPE is applied to the rebuilt keys (:mod:`kvlab.attention.lowrank`), so unlike the MLA conversion
no channel loses its rotation; at full rank the converted model computes the original's logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvlab.config.model import ModelConfig
from kvlab.convert.calibrated import _augmented, _store
from kvlab.convert.finish import finish_conversion, source_state
from kvlab.errors import ConfigError
from kvlab.models.modes import eval_mode

METHODS = ("pca", "fisher")
DAMPING = 0.1          # of F's mean eigenvalue, added to F (see the module docstring)
MIN_RANK = 8           # the least an allocation leaves any key or value latent


def _rank_list(name: str, rank, n: int, width: int) -> list[int]:
    ranks = [rank] * n if not isinstance(rank, Sequence) else list(rank)
    if len(ranks) != n:
        raise ConfigError(f"{name} has {len(ranks)} entries; give one per KV-producing layer ({n}) or one int")
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= width:
            raise ConfigError(f"{name}={r!r} must be in [1, {width}] (n_kv_head x head_dim, the channels it "
                              f"compresses)")
    return ranks


def plan_lowrank(cfg: ModelConfig, *, k_rank: int | Sequence[int], v_rank: int | Sequence[int]) -> ModelConfig:
    """The config of ``cfg`` converted to low-rank K/V, or a :class:`ConfigError` naming the fix.
    ``k_rank``/``v_rank``: one width for every producer layer, or one per producer (in order)."""
    kinds = sorted({s.kind for s in cfg.layer_specs} - {"gqa"})
    if kinds:
        raise ConfigError(f"conversion to low-rank K/V starts from 'gqa' layers; this model has layers of kind(s) "
                          f"{kinds}")
    if cfg.is_encoder_decoder:
        raise ConfigError("conversion to low-rank K/V is built for decoder-only models; pool an encoder–decoder's "
                          "heads instead (kvlab convert --kv-heads/--cross-kv-heads)")
    width, producers = cfg.n_kv_head * cfg.head_dim, cfg.kv_producers
    ks = _rank_list("k_rank", k_rank, len(producers), width)
    vs = _rank_list("v_rank", v_rank, len(producers), width)
    if len(set(ks)) == 1 and len(set(vs)) == 1:
        specs = None if cfg.attention_layers is None else [{"kind": "lowrank", **s.options} for s in cfg.layer_specs]
        return cfg.replace(attn_kind="lowrank", attention_layers=specs,
                           attn_options={**(cfg.attn_options or {}), "k_rank": ks[0], "v_rank": vs[0]})
    per_layer = {p: {"k_rank": k, "v_rank": v} for p, k, v in zip(producers, ks, vs)}
    specs = [{"kind": "lowrank", **s.options, **per_layer.get(i, {})} for i, s in enumerate(cfg.layer_specs)]
    return cfg.replace(attn_kind="lowrank", attention_layers=specs, attn_options=cfg.attn_options)


def check_channels(cfg: ModelConfig, channels) -> None:
    """A :class:`ConfigError` unless ``channels`` (per layer, keys and values together) can be allocated."""
    width = cfg.n_kv_head * cfg.head_dim
    if not isinstance(channels, int) or isinstance(channels, bool) or not 2 <= channels <= 2 * width:
        raise ConfigError(f"channels={channels!r} must be in [2, {2 * width}] (a key and a value latent per layer, "
                          f"each at most n_kv_head x head_dim = {width})")


@torch.enable_grad()
def kv_loss_moments(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """``E[g gᵀ]`` (float64) of the next-token loss's gradient ``g`` with respect to each producer's
    keys (before RoPE) and values, per token, over ``batches`` of token rows ``(B, T)``: keys
    ``(layer, "k")`` and ``(layer, "v")``. The weights stay frozen; only activations get gradients."""
    cfg = model.cfg
    if cfg.is_encoder_decoder:
        raise ConfigError("the loss-weighted fit reads decoder-only token batches; an encoder–decoder has none")
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def watch(key):
        def on_output(module, args, out):
            def on_grad(g):
                g = g.detach().double().flatten(0, 1)
                sums[key] = sums.get(key, 0) + g.T @ g
            if out.requires_grad:
                out.register_hook(on_grad)
        return on_output

    hooks = [model.embed_tokens.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))]
    for i in cfg.kv_producers:
        attn = model.layers[i].self_attn
        hooks += [attn.k_proj.register_forward_hook(watch((i, "k"))),
                  attn.v_proj.register_forward_hook(watch((i, "v")))]
    count = 0
    try:
        with eval_mode(model):
            for tokens in batches:
                tokens = tokens.to(model.device)
                logits = model(tokens[:, :-1]).float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                                         reduction="sum")
                loss.backward()
                count += tokens[:, 1:].numel()
    finally:
        for h in hooks:
            h.remove()
    if not count:
        raise ConfigError("the loss-weighted fit needs at least one batch of calibration tokens")
    return {key: s.cpu() / count for key, s in sums.items()}


def _metric_roots(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F + λI)^{1/2}`` and its inverse, ``λ = DAMPING × mean eigenvalue``."""
    vals, vecs = torch.linalg.eigh(F)
    vals = vals.clamp_min(0)
    vals = vals + DAMPING * vals.mean().clamp_min(torch.finfo(vals.dtype).tiny)
    return (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T


def _spectrum(w: torch.Tensor, S: torch.Tensor, F: torch.Tensor | None):
    """The fit of one latent at every rank: ``(down, up, values)`` with ``down`` ``(width, d+1)``
    and ``up`` ``(width, width)`` ordered by importance (keep the first r rows / columns), and
    ``values`` each component's energy (``pca``) or estimated loss increase (``fisher``)."""
    if F is None:
        vals, U = torch.linalg.eigh(w @ S @ w.T)
        vals, U = vals.flip(0), U.flip(1)
        return U.T @ w, U, vals
    root, inv_root = _metric_roots(F)
    vals, U = torch.linalg.eigh(root @ w @ S @ w.T @ root)
    vals, U = vals.flip(0), U.flip(1)
    return U.T @ root @ w, inv_root @ U, vals


def lowrank_spectra(model, moments: dict, loss_moments: dict | None = None) -> dict:
    """:func:`_spectrum` of every producer's keys and values, keyed ``(layer, "k"|"v")``; weighted by
    the loss (``fisher``) when ``loss_moments`` (:func:`kv_loss_moments`) are given."""
    state = model.state_dict()
    out = {}
    for i in model.cfg.kv_producers:
        for leaf in "kv":
            w = _augmented(state, f"layers.{i}.self_attn.{leaf}_proj")
            out[i, leaf] = _spectrum(w, moments[i, i], None if loss_moments is None else loss_moments[i, leaf])
    return out


def allocate_ranks(spectra: dict, channels: int, *, min_rank: int = MIN_RANK,
                   multiple: int = 1) -> tuple[list[int], list[int]]:
    """Split ``channels × n_kv_layers`` latent channels over the keys and values of every producer
    (``spectra`` from :func:`lowrank_spectra` with loss moments): each keeps at least ``min_rank``
    (or ``channels // 2`` if less), and the rest go to the components whose loss values are largest
    across all of them — the allocation that minimises the summed estimate. With ``multiple`` every
    layer's key + value width is a multiple of it (a quantized cache groups a layer's latent channels
    by 32): whole groups go to the layers whose next group of components is worth the most, and each
    layer splits its width between keys and values by the same values — still the best allocation
    under that constraint. Returns the key and value ranks per producer, in order."""
    layers = sorted({i for i, _ in spectra})
    width = spectra[layers[0], "k"][2].numel()
    if not isinstance(channels, int) or isinstance(channels, bool) or not 2 <= channels <= 2 * width:
        raise ConfigError(f"channels={channels!r} must be in [2, {2 * width}] (a key and a value latent per layer)")
    if channels % multiple:
        raise ConfigError(f"channels={channels} must be a multiple of {multiple} (each layer's latent width is)")
    floor = max(1, min(min_rank, channels // 2))
    extras = {i: sorted(((float(spectra[i, leaf][2][j]), leaf) for leaf in "kv" for j in range(floor, width)),
                        key=lambda t: -t[0]) for i in layers}       # each layer's components beyond the floors
    if multiple == 1:
        rest = sorted(((v, i) for i in layers for v, _ in extras[i]), key=lambda t: -t[0])
        take = dict.fromkeys(layers, 0)
        for _, i in rest[:channels * len(layers) - 2 * floor * len(layers)]:
            take[i] += 1
    else:
        start = -(-2 * floor // multiple) * multiple - 2 * floor              # the least aligned width
        take = dict.fromkeys(layers, start)
        gains = sorted(((sum(v for v, _ in extras[i][t:t + multiple]), i)
                        for i in layers for t in range(start, len(extras[i]) - multiple + 1, multiple)),
                       key=lambda g: -g[0])       # each layer's blocks in order: values fall, so greedy is exact
        for _, i in gains[:(channels * len(layers) - (2 * floor + start) * len(layers)) // multiple]:
            take[i] += multiple
    ranks = {}
    for i in layers:                 # values are sorted within each latent, so a layer's best t are prefixes
        kept = [leaf for _, leaf in extras[i][:take[i]]]
        ranks[i, "k"], ranks[i, "v"] = floor + kept.count("k"), floor + kept.count("v")
    return [ranks[i, "k"] for i in layers], [ranks[i, "v"] for i in layers]


def lowrank_state(model, new_cfg: ModelConfig, spectra: dict) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` converted to the lowrank config ``new_cfg`` (from
    :func:`plan_lowrank`), each latent the first components of its fit in ``spectra``."""
    from kvlab.attention.lowrank import layer_ranks

    cfg = model.cfg
    state = source_state(model)
    dtype = state["embed_tokens.weight"].dtype
    for i in cfg.kv_producers:
        prefix = f"layers.{i}.self_attn"
        for leaf, rank in zip("kv", layer_ranks(new_cfg, i)):
            down, up, _ = spectra[i, leaf]
            for part in ("weight", "bias"):
                state.pop(f"{prefix}.{leaf}_proj.{part}", None)
            _store(state, f"{prefix}.{leaf}_down", down[:rank], dtype, cfg.qkv_bias)
            state[f"{prefix}.{leaf}_up.weight"] = up[:, :rank].to(dtype).contiguous()
    return state


def convert_to_lowrank(model, *, k_rank: int | Sequence[int] | None = None, v_rank: int | Sequence[int] | None = None,
                       channels: int | None = None, method: str | None = None, calibration=None,
                       moments: dict | None = None, loss_moments: dict | None = None, multiple: int = 1):
    """A new model whose producer layers cache key and value latents, fitted on ``calibration``
    token batches ``(B, T)`` run through ``model``.

    Widths: ``k_rank`` and ``v_rank`` (one for every producer, or a list with one per producer), or
    ``channels``: that many per layer on average, allocated across layers and between keys and values
    by :func:`allocate_ranks` (needs ``method='fisher'``, the default then; ``multiple``: every layer's
    latent width a multiple of it, for a quantized cache's groups). ``method``: ``pca``
    (default for given ranks) or ``fisher`` (see the module docstring). ``moments`` (per-layer
    ``attention_input_moments``) and ``loss_moments`` (:func:`kv_loss_moments`) may be passed if
    computed already. Everything else is copied; queries and output projections are unchanged."""
    from kvlab.convert.calibrated import attention_input_moments

    cfg = model.cfg
    if (channels is None) == (k_rank is None and v_rank is None):
        raise ConfigError("give the latent widths as k_rank=R and v_rank=R, or as channels=N (allocated by the loss), "
                          "not both")
    if channels is None and (k_rank is None or v_rank is None):
        raise ConfigError("low-rank K/V needs both k_rank and v_rank")
    method = method or ("fisher" if channels is not None else "pca")
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if channels is not None and method != "fisher":
        raise ConfigError("channels=N splits the budget by each component's estimated loss, which only "
                          "method='fisher' measures; give k_rank and v_rank for method='pca'")
    if channels is None:
        plan_lowrank(cfg, k_rank=k_rank, v_rank=v_rank)            # fail before any calibration pass
    else:
        check_channels(cfg, channels)
        plan_lowrank(cfg, k_rank=1, v_rank=1)
    calibration = list(calibration or [])
    if moments is None or (method == "fisher" and loss_moments is None):
        if not calibration:
            raise ConfigError("conversion to low-rank K/V needs calibration token batches (calibration=[tokens, ...])")
    if moments is None:
        moments = attention_input_moments(model, calibration, [(i, i) for i in cfg.kv_producers])
    if method == "fisher" and loss_moments is None:
        loss_moments = kv_loss_moments(model, calibration)
    spectra = lowrank_spectra(model, moments, loss_moments if method == "fisher" else None)
    if channels is not None:
        k_rank, v_rank = allocate_ranks(spectra, channels, multiple=multiple)
    new_cfg = plan_lowrank(cfg, k_rank=k_rank, v_rank=v_rank)
    state = lowrank_state(model, new_cfg, spectra)
    step = dict(method=method, to="lowrank", k_rank=k_rank, v_rank=v_rank, channels=channels,
                calibration_tokens=sum(int(t.numel()) for t in calibration),
                kv_bytes_per_token_bf16=[cfg.kv_bytes_per_token("bf16"), new_cfg.kv_bytes_per_token("bf16")])
    return finish_conversion(model, new_cfg, state, step)

"""The caches ``kvlab shrink`` considers: each a :class:`Candidate` value — a structure of the KV cache
and a precision for it — made by a family, which also converts the original model to the structure
with its best starting point.

A family is a structure (the original's, stored in another precision; fewer KV heads and cross-layer
sharing; MLA latents; low-rank key and value latents) with three things: which candidates meet a
budget at a precision, which calibration statistics its conversion needs, and the conversion. A new
family is one more entry in :data:`FAMILIES`, and a new precision one more in :data:`PRECISIONS`:
neither is a branch in the recipe.

Budgets are total bytes per token, a quantized cache's scales included; a structure is counted in
bf16 when it keeps the model's own precision.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kvlab.config.accounting import kind_holds, kv_quant_fits, layer_kv_quant
from kvlab.config.model import ModelConfig
from kvlab.convert.balance import balance_keys, balanceable_layers
from kvlab.convert.calibrated import attention_input_moments, needed_moments
from kvlab.convert.heads import convert
from kvlab.convert.lowrank import convert_to_lowrank, kv_loss_moments, plan_lowrank
from kvlab.convert.mla import convert_to_mla, plan_mla
from kvlab.dtypes import QUANT_GROUP, KVQuant, LayeredKVQuant, MixedKVQuant, parse_kv_quant
from kvlab.errors import ConfigError
from kvlab.eval.precision import allocate_by_loss, layer_formats

# The cache precisions a candidate may have: None keeps the model's own (counted as bf16); the rest
# are kvlab's quantized caches (kvlab.cache.quantized), each a format a runtime serves too. int8/int4
# is int8 keys with int4 values (llama.cpp's -ctk q8_0 -ctv q4_1): keys are what rounding hurts.
# int8/int4-h and int4-h are the same bytes stored rotated (a Hadamard transform before rounding), which
# kvlab serves and other runtimes do not: where the runtime has both, the plain one is left out
# (undominated), since on SmolLM2 rotation cut int4's cost from +6.6 % to +5.0 % and int8/int4's from
# +0.58 % to +0.48 %. "by-layer": the original structure with a key and a value format per layer,
# allocated by the loss within the budget (kvlab.eval.precision) once the calibration statistics are
# in (resolve_candidates).
BY_LAYER = "by-layer"
PRECISIONS: tuple[str | None, ...] = (None, "fp8", "int8", "int8/int4", "int4", "int8/int4-h", "int4-h", BY_LAYER)


def integer_keys(precision: str | None) -> bool:
    """Whether a cache in ``precision`` keeps keys as integer codes in some layer: the caches balanced
    keys are for (a float one, fp8 included, stores them as projected; kvlab.cache.cache.integer_key_layers)."""
    if precision == BY_LAYER:
        return True                  # allocated among formats with int8 and int4 keys
    kvq = parse_kv_quant(precision)
    if kvq is None:
        return False
    return any(not fmt.formats[0].is_float for fmt in (kvq.assigned if isinstance(kvq, LayeredKVQuant) else (kvq,)))


def undominated(precisions) -> list[str | None]:
    """``precisions`` without a plain format whose rotated twin (``-h``: the same bytes, less error) is
    among them."""
    return [p for p in precisions if p is None or p == BY_LAYER or f"{p}-h" not in precisions]


@dataclass(frozen=True)
class Candidate:
    """One cache that meets the budget: a structure made by ``family`` (the converted model's
    attention ``kind``, and ``change``, the family's conversion parameters: ``n_kv_head``/``cla`` for
    'heads', ``kv_lora_rank``/``qk_rope_head_dim`` for 'mla', ``k_rank``/``v_rank`` or ``channels``
    with ``method`` for 'lowrank', nothing for 'cache'), stored in ``precision`` (None: the model's
    own), and its bytes per token, scales included (bf16 for the model's own precision)."""

    name: str
    family: str
    kind: str
    change: dict
    kv_bytes: int
    precision: str | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    @property
    def kv_quant(self) -> KVQuant | MixedKVQuant | LayeredKVQuant | None:
        if self.precision == BY_LAYER:
            raise ConfigError(f"{self.name}: its precision per layer is allocated after calibration "
                              f"(resolve_candidates)")
        return parse_kv_quant(self.precision)

    @property
    def structure(self) -> tuple[str, str]:
        """What the conversion makes, whatever the precision it is then stored in."""
        return self.family, json.dumps(self.change, sort_keys=True)

    @property
    def restructured(self) -> bool:
        """Whether the model changes (else only the cache's precision does: nothing to train)."""
        return self.family != "cache"

    @property
    def loss_fitted(self) -> bool:
        """Whether its start is fitted to the loss (the Fisher-weighted latents) rather than to the
        activations' squared error."""
        return self.change.get("method") == "fisher"


def _named(structure: str, precision: str | None) -> str:
    return structure if precision is None else f"{structure} × {precision}"


def _bytes(cfg: ModelConfig, precision: str | None) -> int:
    return cfg.kv_bytes_per_token("bf16", parse_kv_quant(precision))


def _grouped(precision: str | None) -> bool:
    """Whether ``precision`` stores parameters per group of channels (an integer format, for keys or values)."""
    kvq = parse_kv_quant(precision)
    return kvq is not None and any(not f.is_float for f in kvq.formats)


def _holds(cfg: ModelConfig, precision: str | None) -> bool:
    """Whether every layer of ``cfg`` can store its cache in ``precision``: keys and values in two formats
    need kinds that cache them apart (``separate_kv_cache``; an MLA or low-rank latent is both at once)."""
    return kv_quant_fits(cfg, parse_kv_quant(precision))


def _kind_holds(kind: str, precision: str | None) -> bool:
    """Whether layers of attention ``kind`` can store their cache in ``precision`` (as :func:`_holds`)."""
    return kind_holds(kind, parse_kv_quant(precision))


def _aligned(width: int, precision: str | None) -> bool:
    """Whether a latent of ``width`` channels is whole groups of ``precision``'s format. A width 32
    does not divide is one group (:func:`kvlab.dtypes.quant_group`): one scale for hundreds of values
    cost MLA 334+16 at int4 a proxy perplexity of 162,000 on SmolLM2 (MLA 240+48, 288 wide: 51)."""
    return not _grouped(precision) or width % QUANT_GROUP == 0


def _widest(fits: Callable[[int], bool], most: int) -> int:
    """The largest width in [1, most] that ``fits`` (0 if none): ``fits`` is monotone, but a format
    may refuse single widths (int4 packs channels in pairs), so a refused width is skipped."""
    for width in range(most, 0, -1):
        try:
            if fits(width):
                return width
        except ConfigError:
            continue
    return 0


class Family(Protocol):
    name: str
    # Whether its conversion computes the original model exactly at full width (so a start fitted by
    # the loss is close to the original and attention transfer would trade it away; see
    # planning.transfer_fraction). MLA's is not: it drops the rotation of most key channels.
    exact_at_full_width: bool

    def candidates(self, cfg: ModelConfig, budget: int, precision: str | None) -> list[Candidate]: ...

    def plan(self, cfg: ModelConfig, cand: Candidate) -> ModelConfig: ...

    def moment_pairs(self, cfg: ModelConfig, cand: Candidate) -> set[tuple[int, int]]: ...

    def convert(self, base, cand: Candidate, calibration, moments: dict) -> Any: ...


class CacheFamily:
    """The original structure in a quantized cache: no conversion, nothing to train. At precision
    "by-layer" its one candidate is a key and a value format per layer allocated by the loss within
    the budget; which ones is known once the calibration statistics are (:meth:`resolve`)."""

    name = "cache"
    exact_at_full_width = True

    def candidates(self, cfg: ModelConfig, budget: int, precision: str | None) -> list[Candidate]:
        if precision == BY_LAYER:
            formats = layer_formats(cfg)
            if not _holds(cfg, f"{formats[-1]}/{formats[0]}") or _bytes(cfg, formats[-1]) > budget:
                return []
            return [Candidate("by-layer cache", self.name, "+".join(cfg.kinds), {"method": "fisher"}, budget,
                              BY_LAYER)]
        if precision is None or not _holds(cfg, precision) or _bytes(cfg, precision) > budget:
            return []
        return [Candidate(f"{precision} cache", self.name, "+".join(cfg.kinds), {}, _bytes(cfg, precision),
                          precision)]

    def resolve(self, base, cand: Candidate, calibration, moments: dict) -> Candidate:
        """The "by-layer" ``cand`` with its precision per layer allocated."""
        kv_quant, _ = allocate_by_loss(base, calibration, moments["kv_loss"], cand.kv_bytes)
        return Candidate(f"by-layer cache ({_layer_summary(base.cfg, kv_quant)})", self.name, cand.kind, cand.change,
                         base.cfg.kv_bytes_per_token("bf16", kv_quant), kv_quant.name)

    def plan(self, cfg: ModelConfig, cand: Candidate) -> ModelConfig:
        return cfg

    def moment_pairs(self, cfg: ModelConfig, cand: Candidate) -> set[tuple[int, int]]:
        return set()

    def convert(self, base, cand: Candidate, calibration, moments: dict) -> Any:
        return base


def _layer_summary(cfg: ModelConfig, kv_quant) -> str:
    """``'keys int8 ×26, fp8 ×4; values int8 ×21, int4 ×9'``: how many caching layers keep each format."""
    counts: dict[str, dict[str, int]] = {"keys": {}, "values": {}}
    for i in cfg.kv_producers:
        fmt = layer_kv_quant(cfg, i, kv_quant)
        for field, f in zip(counts, (fmt.formats[0], fmt.formats[-1])):
            counts[field][f.name] = counts[field].get(f.name, 0) + 1
    return "; ".join(f"{field} " + ", ".join(f"{n} ×{c}" for n, c in sorted(fc.items(), key=lambda x: -x[1]))
                     for field, fc in counts.items())


class HeadsFamily:
    """GQA/MQA/CLA: for each KV-head count that divides the model's, the least cross-layer sharing
    that fits; calibrated merging of heads and layers."""

    name = "heads"
    exact_at_full_width = False

    def candidates(self, cfg: ModelConfig, budget: int, precision: str | None) -> list[Candidate]:
        out = []
        for heads in [h for h in range(cfg.n_kv_head, 0, -1) if cfg.n_kv_head % h == 0]:
            for cla in range(1, cfg.n_layer + 1):
                if heads == cfg.n_kv_head and cla == 1:
                    continue                          # the original structure: the 'cache' family's
                new = cfg.replace(n_kv_head=heads, cla=cla)
                if not _holds(new, precision):
                    break
                if _bytes(new, precision) <= budget:
                    base = "MQA" if heads == 1 else f"GQA-{heads}"
                    out.append(Candidate(_named(base + (f"-CLA{cla}" if cla > 1 else ""), precision), self.name,
                                         "gqa", {"n_kv_head": heads, "cla": cla}, _bytes(new, precision), precision))
                    break
        return out

    def plan(self, cfg: ModelConfig, cand: Candidate) -> ModelConfig:
        return cfg.replace(**cand.change)

    def moment_pairs(self, cfg: ModelConfig, cand: Candidate) -> set[tuple[int, int]]:
        return set(needed_moments(cfg, cfg.replace(**cand.change)))

    def convert(self, base, cand: Candidate, calibration, moments: dict) -> Any:
        cla = cand.change["cla"]
        return convert(base, method="calibrated", calibration=calibration, moments=moments,
                       n_kv_head=cand.change["n_kv_head"], cla=cla if cla > 1 else None)


class MLAFamily:
    """MLA with a shared RoPE key of a quarter, half or three quarters of a head and the widest latent
    the budget allows beside it; the latent fitted in the loss's metric (``fisher``: on SmolLM2 at half
    the KV, MLA 160+32 starts at perplexity 24.2 against 28.5 for PCA)."""

    name = "mla"
    exact_at_full_width = False

    def candidates(self, cfg: ModelConfig, budget: int, precision: str | None) -> list[Candidate]:
        if cfg.pos != "rope" or not _kind_holds("mla", precision):
            return []
        out = []
        D = cfg.head_dim
        for rope in sorted({max(2, (D * f // 4) // 2 * 2) for f in (1, 2, 3)}):
            def fits(rank: int, rope=rope) -> bool:     # whole groups for the latent and for the RoPE key
                return _aligned(rank, precision) and _aligned(rank + rope, precision) and _bytes(
                    plan_mla(cfg, kv_lora_rank=rank, qk_rope_head_dim=rope), precision) <= budget
            try:
                rank = _widest(fits, cfg.n_kv_head * (2 * D - rope))
            except ConfigError:
                continue
            if rank < 1:
                continue
            new = plan_mla(cfg, kv_lora_rank=rank, qk_rope_head_dim=rope)
            out.append(Candidate(_named(f"MLA {rank}+{rope}", precision), self.name, "mla",
                                 {"kv_lora_rank": rank, "qk_rope_head_dim": rope, "method": "fisher"},
                                 _bytes(new, precision), precision))
        return out

    def plan(self, cfg: ModelConfig, cand: Candidate) -> ModelConfig:
        return plan_mla(cfg, **cand.change)

    def moment_pairs(self, cfg: ModelConfig, cand: Candidate) -> set[tuple[int, int]]:
        return set()

    def convert(self, base, cand: Candidate, calibration, moments: dict) -> Any:
        return convert_to_mla(base, calibration=calibration, moments=moments, loss_moments=moments.get("kv_loss"),
                              **cand.change)


class LowRankFamily:
    """Low-rank key and value latents (Palu: keys rebuilt, then rotated) with a quarter, a third or
    half of each producer's latent channels for the keys (keys are lower-rank than values in trained
    models), and the same channels split across layers and between keys and values by each
    component's estimated effect on the loss (the Fisher-weighted fit): on SmolLM2 at half the KV it
    starts at proxy 10.5 against 12.1 for the best uniform split."""

    name = "lowrank"
    exact_at_full_width = True

    def candidates(self, cfg: ModelConfig, budget: int, precision: str | None) -> list[Candidate]:
        if cfg.is_encoder_decoder or not _kind_holds("lowrank", precision):
            return []
        width = 2 * cfg.n_kv_head * cfg.head_dim

        def fits(channels: int) -> bool:       # one latent vector per producer and token
            return _aligned(channels, precision) and _bytes(
                plan_lowrank(cfg, k_rank=max(1, channels // 2), v_rank=channels - max(1, channels // 2)),
                precision) <= budget
        channels = _widest(fits, width) if width >= 2 else 0
        if channels < 2:
            return []
        out = []
        for k_share in (4, 3, 2):
            k_rank = max(1, round(channels / k_share))
            try:
                new = plan_lowrank(cfg, k_rank=k_rank, v_rank=channels - k_rank)
            except ConfigError:
                continue
            out.append(Candidate(_named(f"Low-rank K{k_rank}+V{channels - k_rank}", precision), self.name, "lowrank",
                                 {"k_rank": k_rank, "v_rank": channels - k_rank}, _bytes(new, precision), precision))
        new = plan_lowrank(cfg, k_rank=channels // 2, v_rank=channels - channels // 2)     # the same bytes
        change = {"channels": channels, "method": "fisher"}
        if _grouped(precision):             # every layer's latent in whole groups of its format
            change["multiple"] = QUANT_GROUP
        out.append(Candidate(_named(f"Low-rank {channels} allocated", precision), self.name, "lowrank",
                             change, _bytes(new, precision), precision))
        return out

    def plan(self, cfg: ModelConfig, cand: Candidate) -> ModelConfig:
        """The widths given, or for channels allocated by the loss (known only after calibration)
        an even split of the same bytes."""
        change = cand.change
        if "channels" in change:            # (its "multiple" needs no plan: the mean width is one already)
            c = change["channels"]
            return plan_lowrank(cfg, k_rank=c // 2, v_rank=c - c // 2)
        return plan_lowrank(cfg, k_rank=change["k_rank"], v_rank=change["v_rank"])

    def moment_pairs(self, cfg: ModelConfig, cand: Candidate) -> set[tuple[int, int]]:
        return set()

    def convert(self, base, cand: Candidate, calibration, moments: dict) -> Any:
        return convert_to_lowrank(base, calibration=calibration, moments=moments, loss_moments=moments.get("kv_loss"),
                                  **cand.change)


# Enumeration follows this order; a candidate's family is its key here.
FAMILIES: dict[str, Family] = {f.name: f for f in (CacheFamily(), HeadsFamily(), MLAFamily(), LowRankFamily())}


def parse_kv_budget(spec: str, cfg: ModelConfig) -> int:
    """``'2x'`` (a reduction factor) or a number of bytes per token (bf16) -> bytes per token."""
    if cfg.is_encoder_decoder:
        raise ConfigError("kvlab shrink works on decoder-only models; convert an encoder–decoder with kvlab convert "
                          "(--kv-heads/--cross-kv-heads/--cross-cla, --method calibrated) and uptrain it with "
                          "kvlab train --init")
    original = cfg.kv_bytes_per_token("bf16")
    text = str(spec).strip().lower()
    try:
        if text.endswith("x"):
            factor = float(text[:-1])
            if not factor > 1:
                raise ValueError
            return int(original // factor)
        value = int(text)
        if value < 1:
            raise ValueError
        return value
    except ValueError:
        raise ConfigError(f"--kv {spec!r} is neither a reduction factor above 1 (2x, 3x, 6x) nor a positive number "
                          f"of bytes per token; the model has {original:,} bytes per token (bf16)") from None


def enumerate_candidates(cfg: ModelConfig, budget: int, precisions=PRECISIONS) -> list[Candidate]:
    """The caches of ``cfg`` within ``budget`` bytes per token, each structure as large as the budget
    allows at its precision. A structure in a precision whose plain cache fits the budget already is
    left out: the plain cache in that precision keeps more of the model for the same format."""
    original = cfg.kv_bytes_per_token("bf16")
    if budget >= original:
        raise ConfigError(f"the model's cache is {original:,} bytes per token (bf16), within the budget of {budget:,} "
                          f"already; ask for a smaller one (e.g. --kv 2x)")
    out = []
    for precision in precisions:
        plain = FAMILIES["cache"].candidates(cfg, budget, precision)
        out += plain
        if not plain and precision != BY_LAYER:     # a precision per layer is the original structure's only
            out += [c for name, family in FAMILIES.items() if name != "cache"
                    for c in family.candidates(cfg, budget, precision)]
    if not out:
        smallest = cfg.replace(n_kv_head=1, cla=cfg.n_layer).kv_bytes_per_token("bf16", parse_kv_quant("int4"))
        raise ConfigError(f"no cache of this model fits {budget:,} bytes per token; the smallest kvlab makes is "
                          f"{smallest:,} (MQA shared by every layer, int4)")
    return out


def admitted_by(target, cfg: ModelConfig, candidates: list[Candidate]) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates ``target`` (:class:`~kvlab.recipes.shrink.targets.Target`) executes natively, and
    why each of the others is left out (candidate name -> reason)."""
    admitted, refused = [], {}
    for cand in candidates:
        reason = target.refusal(plan_candidate(cfg, cand), cand.precision)
        if reason is None:
            admitted.append(cand)
        else:
            refused[cand.name] = reason
    return admitted, refused


def resolve_candidates(base, candidates: list[Candidate], calibration, moments: Callable[[], dict],
                       log: Callable[[str], None] = print) -> list[Candidate]:
    """``candidates`` with what is known only after calibration (a precision per layer; ``moments``
    computes the statistics when first needed); one that comes out equal to another candidate's
    precision is dropped (the same cache twice)."""
    out: list[Candidate] = []
    for cand in candidates:
        family = FAMILIES[cand.family]
        resolved = family.resolve(base, cand, calibration, moments()) if cand.precision == BY_LAYER else cand
        if resolved is not cand:
            log(f"  {resolved.name}: {resolved.kv_bytes:,} B/token, --kv-quant {resolved.precision}")
            if any(c.precision == resolved.precision and c.family == resolved.family for c in candidates):
                continue
        out.append(resolved)
    return out


def plan_candidate(cfg: ModelConfig, cand: Candidate) -> ModelConfig:
    """The config of ``cfg``'s model converted to ``cand``'s structure (shapes only, no weights)."""
    return FAMILIES[cand.family].plan(cfg, cand)


def convert_candidate(base, cand: Candidate, calibration, moments: dict, balance_text=None) -> Any:
    """``base`` converted to ``cand``'s structure with its family's best starting point (from
    ``moments``); the precision is the cache's, chosen when the model runs. Keys are balanced as
    ``base``'s are (:func:`balanced_like`, on ``balance_text``)."""
    model = FAMILIES[cand.family].convert(base, cand, calibration, moments)
    return balanced_like(base, model, cand, balance_text)


def balanced_like(base, model, cand: Candidate, balance_text) -> Any:
    """``model`` (made from ``base``) with its keys stored balanced where ``base``'s are and ``cand``'s
    cache keeps integer keys: a conversion, or training, leaves the balance of other projections behind, so it
    is fitted again on ``balance_text``, the windows ``base``'s was fitted on (:mod:`kvlab.convert.balance`)."""
    if model is base or not base.cfg.key_balance or not integer_keys(cand.precision) or \
            not balanceable_layers(model.cfg):
        return model
    if balance_text is None:
        raise ConfigError("a model made from one whose keys are balanced needs the text to balance its own on")
    return balance_keys(model, balance_text)


def moments_for(base, candidates: list[Candidate], calibration) -> dict:
    """One set of calibration statistics for every candidate's conversion: the attention inputs'
    second moments per layer (and per pair of layers a CLA merge needs), and the loss's gradient
    moments when a candidate is fitted to the loss (one backward pass per calibration batch)."""
    pairs = {(i, i) for i in range(base.cfg.n_layer)}
    for cand in candidates:
        pairs |= FAMILIES[cand.family].moment_pairs(base.cfg, cand)
    moments = attention_input_moments(base, calibration, sorted(pairs))
    if any(cand.loss_fitted for cand in candidates):
        moments["kv_loss"] = kv_loss_moments(base, calibration)
    return moments

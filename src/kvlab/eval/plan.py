"""KV-cache planning: how many sequences of a given context fit in a memory budget, per variant.

Everything here is closed-form from :class:`~kvlab.config.model.ModelConfig` (no model is built), so
it works for 70B presets on a laptop. Activations and allocator overhead are not counted: the
batch is an upper bound set by weights + KV cache alone.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from kvlab.attention.gqa import heads_label
from kvlab.config.model import ModelConfig
from kvlab.dtypes import KVQuant, dtype_bytes
from kvlab.errors import ConfigError
from kvlab.registry import get_kind

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``'24GiB'``, ``'80GB'``, ``'512MiB'``, ``'1.5TiB'``, ``'1000'`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ConfigError(f"memory size {text!r} is not understood; write a number with a unit such as "
                          f"24GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def kv_label(cfg: ModelConfig) -> str:
    """The model's attention as each layer kind names it (MHA / GQA-g / MQA, MLA r+R, Low-rank Kk+Vv,
    Linear-g, ...; kinds joined by '+' in a hybrid), with -CLAk or -CLA(custom) appended when layers
    share KV; an encoder–decoder's cross-attention follows in brackets when it is wired differently
    from the self-attention."""
    label = _self_label(cfg)
    if cfg.is_encoder_decoder:
        cross = heads_label(cfg.cross_n_kv_head, cfg.n_head) + (f"-CLA{cfg.cross_cla}" if cfg.cross_cla > 1 else "")
        if cross != label:
            label += f" (cross {cross})"
    return label


def _self_label(cfg: ModelConfig) -> str:
    specs = cfg.layer_specs
    base = "+".join(get_kind(name).layer_label(cfg, [i for i, s in enumerate(specs) if s.kind == name])
                    for name in cfg.kinds)
    if cfg.kv_source is not None and cfg.n_kv_layers < cfg.n_layer:
        return f"{base}-CLA(custom)"
    return f"{base}-CLA{cfg.cla}" if cfg.cla > 1 else base


def _has_kv_heads(cfg: ModelConfig) -> bool:
    """Whether some layer's cache holds n_kv_head heads (so GQA/MQA variants shrink it); a latent
    cache (MLA, low-rank) is the same whatever the head count."""
    return any(get_kind(name).capabilities.kv_heads for name in cfg.kinds)


def _wiring(cfg: ModelConfig) -> tuple:
    cross = (cfg.cross_n_kv_head, tuple(cfg.cross_kv_sources)) if cfg.is_encoder_decoder else ()
    return (cfg.n_kv_head, tuple(cfg.kv_sources), *cross)


def variants(cfg: ModelConfig) -> list[ModelConfig]:
    """MHA, every GQA divisor, MQA, then CLA2 and CLA3 (with the model's KV heads) and MQA-CLA2; for
    a model whose caches do not depend on the KV head count (MLA, low-rank latents) its own caches
    with CLA1/2/3.

    An encoder–decoder's variants convert its cross-attention alike (the GQA paper's choice): the same
    KV heads, and the same sharing factor across decoder layers.

    The model itself is in the list (first, if its wiring is none of those); duplicates appear once.
    """
    def valid(**change) -> list[ModelConfig]:
        if cfg.is_encoder_decoder:
            change.update(cross_n_kv_head=change.get("n_kv_head", cfg.n_kv_head), cross_cla=change.get("cla", 1))
        try:                 # e.g. linear-attention layers share no KV across layers: no CLA variants
            return [cfg.replace(**change)]
        except ConfigError:
            return []

    if not _has_kv_heads(cfg):
        out = [c for k in (1, 2, 3) if k <= cfg.n_layer for c in valid(cla=k)]
    else:
        out = [c for h in range(cfg.n_head, 0, -1) if cfg.n_head % h == 0 for c in valid(n_kv_head=h, cla=1)]
        out += [c for k in (2, 3) if k <= cfg.n_layer for c in valid(cla=k)]
        if cfg.n_layer >= 2:
            out += valid(n_kv_head=1, cla=2)
    if _wiring(cfg) not in {_wiring(c) for c in out}:
        out.insert(0, cfg)
    unique: dict[tuple, ModelConfig] = {}
    for c in out:
        unique.setdefault(_wiring(c), c)
    return list(unique.values())


@dataclass
class PlanRow:
    variant: str
    is_model: bool
    n_kv_head: int
    n_kv_layers: int
    params: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_sequence: int
    max_batch: int


def max_batch(cfg: ModelConfig, memory: int, context: int, dtype: str | torch.dtype = "bf16",
              kv_quant: str | KVQuant | None = None, source_tokens: int = 0) -> int:
    """The largest batch of ``context``-token sequences (of ``source_tokens``-token sources, for an
    encoder–decoder) whose cache fits beside the weights (weights in ``dtype``; the cache in ``dtype``
    or, with ``kv_quant``, fp8, or int8/int4 plus scales)."""
    weights = cfg.param_counts()["total"] * dtype_bytes(dtype)
    return max(0, (memory - weights) // cfg.cache_bytes(dtype, kv_quant).for_sequence(context, source_tokens))


def plan(cfg: ModelConfig, memory: int, context: int, dtype: str | torch.dtype = "bf16",
         kv_quant: str | KVQuant | None = None, source_tokens: int | None = None) -> list[PlanRow]:
    """One row per variant: KV bytes per token and per sequence, and the largest batch that fits; an
    encoder–decoder's sequences hold ``source_tokens`` of cross-attention K/V too (default: ``context``)."""
    source = (context if source_tokens is None else source_tokens) if cfg.is_encoder_decoder else 0
    if not isinstance(context, int) or context < 1:
        raise ConfigError(f"context={context!r} must be a positive number of tokens")
    if memory < 1:
        raise ConfigError(f"memory={memory!r} must be a positive number of bytes")
    rows = []
    for v in variants(cfg):
        params = v.param_counts()["total"]
        weights = params * dtype_bytes(dtype)
        cost = v.cache_bytes(dtype, kv_quant)    # per token and per sequence, over the layers' kinds
        per_token, per_seq = cost.per_token, cost.for_sequence(context, source)
        rows.append(PlanRow(variant=kv_label(v), is_model=_wiring(v) == _wiring(cfg), n_kv_head=v.n_kv_head,
                            n_kv_layers=v.n_kv_layers, params=params, weight_bytes=weights,
                            kv_bytes_per_token=per_token, kv_bytes_per_sequence=per_seq,
                            max_batch=max_batch(v, memory, context, dtype, kv_quant, source)))
    return rows


def plan_as_dicts(rows: list[PlanRow]) -> list[dict]:
    return [asdict(r) for r in rows]

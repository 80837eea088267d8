"""Per-layer attention specs: which kind each layer is, and that kind's options for it.

One way for every kind: a kind's settings are its *options* (declared at its registration), given
model-wide in ``ModelConfig.attn_options`` for the layers of ``attn_kind``, or per layer in an
``attention_layers`` spec ``{"kind": name, **options}`` (which overrides the model-wide ones), and
the kind fills in the defaults of the rest (``option_defaults``). MLA's latent widths, low-rank's
key and value widths, linear attention's feature map and a compressed layer's block are all options
in this sense; nothing about a kind sits in ``ModelConfig`` as a field of its own.

Configs written before this rule kept MLA's and low-rank's settings as top-level fields
(``kv_lora_rank``, ``k_rank``, ...): :func:`migrate_legacy_fields` moves them into options when such
a config is read, so every checkpoint kvlab ever wrote still loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvlab.errors import ConfigError
from kvlab.registry import KINDS, get_kind

if TYPE_CHECKING:   # annotations only: ModelConfig calls this module, not the other way round
    from kvlab.config.model import ModelConfig

DEFAULT_KIND = "gqa"

# The top-level fields that configs used to carry for these kinds (kvlab 0.1 to the kind-options
# change), in the kinds' option names.
LEGACY_KIND_FIELDS = {
    "mla": ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "latent_norm"),
    "lowrank": ("k_rank", "v_rank"),
}


@dataclass(frozen=True)
class LayerSpec:
    """One layer's attention: a registered kind and its options."""

    kind: str = DEFAULT_KIND
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: Any, layer: int) -> "LayerSpec":
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, dict) and isinstance(spec.get("kind"), str):
            return cls(spec["kind"], {k: v for k, v in spec.items() if k != "kind"})
        raise ConfigError(f"attention_layers[{layer}]={spec!r} is not a kind name or a dict with a 'kind' "
                          f"key; registered kinds are {sorted(KINDS)}")

    def __hash__(self) -> int:
        return hash((self.kind, json.dumps(self.options, sort_keys=True, default=str)))


def given_specs(cfg: "ModelConfig") -> list[LayerSpec]:
    """Each layer's kind and the options the config gives it (model-wide options merged in for the
    layers of ``attn_kind``), before any default: what validation checks names against."""
    model_wide = cfg.attn_options or {}
    if cfg.attention_layers is None:
        return [LayerSpec(cfg.attn_kind, dict(model_wide))] * cfg.n_layer
    out = []
    for i, raw in enumerate(cfg.attention_layers):
        spec = LayerSpec.parse(raw, i)
        if model_wide and spec.kind == cfg.attn_kind:
            spec = LayerSpec(spec.kind, {**model_wide, **spec.options})
        out.append(spec)
    return out


def resolve_specs(cfg: "ModelConfig") -> list[LayerSpec]:
    """:func:`given_specs` with each kind's defaults filled in for the options left out."""
    resolved: dict[int, LayerSpec] = {}      # the flat form's one spec object, on every layer, resolved once
    out = []
    for spec in given_specs(cfg):
        if id(spec) not in resolved:
            kind = KINDS.get(spec.kind)                # an unknown kind is refused by validation
            defaults = kind.option_defaults(cfg, spec.options) if kind and kind.option_defaults else {}
            resolved[id(spec)] = LayerSpec(spec.kind, {**defaults, **spec.options}) if defaults else spec
        out.append(resolved[id(spec)])
    return out


def migrate_legacy_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the old top-level kind fields moved into options: model-wide for the
    layers of ``attn_kind``, else into each per-layer spec of that kind that does not set them.
    Fields left ``null`` (as every model without such a layer saved them) are dropped."""
    if not any(name in data for names in LEGACY_KIND_FIELDS.values() for name in names):
        return data
    data = dict(data)
    for kind, names in LEGACY_KIND_FIELDS.items():
        values = {name: data.pop(name) for name in names if name in data}
        values = {name: value for name, value in values.items() if value is not None}
        if not values:
            continue
        if data.get("attn_kind") == kind:
            data["attn_options"] = {**values, **(data.get("attn_options") or {})}
        elif isinstance(data.get("attention_layers"), list):
            data["attention_layers"] = [
                {**spec, **{k: v for k, v in values.items() if k not in spec}}
                if isinstance(spec, dict) and spec.get("kind") == kind
                else {"kind": kind, **values} if spec == kind else spec
                for spec in data["attention_layers"]]
    return data


def validate_specs(cfg: "ModelConfig") -> None:
    """Each layer's kind is registered, its options are the kind's, it shares KV only with a layer
    of its own kind, and the kind accepts its options."""
    if cfg.attention_layers is not None and len(cfg.attention_layers) != cfg.n_layer:
        raise ConfigError(f"attention_layers has {len(cfg.attention_layers)} entries but n_layer="
                          f"{cfg.n_layer}; give one spec per layer")
    if cfg.attn_options is not None:
        allowed = get_kind(cfg.attn_kind).options
        unknown = sorted(set(cfg.attn_options) - set(allowed))
        if unknown:
            raise ConfigError(f"attn_options: attention kind {cfg.attn_kind!r} has no option(s) {unknown}; "
                              f"its options are {list(allowed)}")
    given = given_specs(cfg)
    for i, spec in enumerate(given):
        unknown = sorted(set(spec.options) - set(get_kind(spec.kind).options))
        if unknown:
            raise ConfigError(f"layer {i}: attention kind {spec.kind!r} has no option(s) {unknown}; "
                              f"its options are {list(get_kind(spec.kind).options)}")
    specs, sources = cfg.layer_specs, cfg.kv_sources
    for i, spec in enumerate(specs):
        if sources[i] != i and specs[sources[i]].kind != spec.kind:
            raise ConfigError(f"layer {i} ({spec.kind}) reads the KV of layer {sources[i]} "
                              f"({specs[sources[i]].kind}); a layer can share KV only with a layer of its kind")
        kind = get_kind(spec.kind)
        if kind.validate is not None:
            kind.validate(cfg, i, spec.options)

"""``kvlab info``: a model's shape, parameters and cache bytes."""

from __future__ import annotations

import argparse
import json

from kvlab.cli.common import add_model_source, model_config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameters, heads and KV bytes per token of a model",
                       description="Show a model's shape, parameter counts and KV bytes per token.")
    add_model_source(p)
    p.add_argument("--list-presets", action="store_true", help="list the built-in presets and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.config.model import PRESETS

    if args.list_presets:
        for name in PRESETS:
            print(name)
        return 0
    cfg = model_config_from_args(args)
    cost = cfg.cache_bytes(args.dtype, args.kv_quant)
    info = _info(cfg, cost, args)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = _rows(cfg, cost, info, args)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _info(cfg, cost, args: argparse.Namespace) -> dict:
    """``--json``'s fields."""
    from kvlab.eval.plan import kv_label

    counts = cfg.param_counts()
    info = {
        "name": cfg.name, "variant": kv_label(cfg), "params": counts["total"],
        "attention_params": counts["attention"], "n_layer": cfg.n_layer, "d_model": cfg.d_model,
        "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "n_kv_layers": cfg.n_kv_layers, "kv_sources": cfg.kv_sources, "dtype": args.dtype,
        "kv_quant": args.kv_quant,
        "kv_bytes_per_token": cost.per_token, "cache_bytes_per_sequence": cost.per_sequence,
        "cache_bytes_windowed": [{"bytes_per_token": r, "up_to_tokens": c} for r, c in cost.bounded],
        "cache_bytes_pooled": [{"bytes_per_slot": r, "tokens_per_slot": c} for r, c in cost.pooled],
        "attention": [{"kind": s.kind, **s.options} for s in cfg.layer_specs],
        "param_counts": counts,
    }
    if cfg.is_encoder_decoder:
        info.update(n_encoder_layer=cfg.n_encoder_layer, cross_n_kv_head=cfg.cross_n_kv_head,
                    cross_kv_sources=cfg.cross_kv_sources, cross_bytes_per_source_token=cost.per_source_token)
    return info


def _rows(cfg, cost, info: dict, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The table's rows: (label, text)."""
    from kvlab.config.specs import DEFAULT_KIND
    from kvlab.eval.plan import format_bytes

    counts = info["param_counts"]
    rows = [
        ("model", f"{cfg.name or '(custom)'}  [{info['variant']}]"),
        ("parameters", f"{counts['total']:,} (attention {counts['attention']:,}, mlp {counts['mlp']:,}, "
                       f"embedding {counts['embedding']:,})"),
        ("layers", f"{cfg.n_layer} x d_model {cfg.d_model}, {cfg.block} blocks, {cfg.mlp}, {cfg.norm}, {cfg.pos}"),
        ("heads", _heads(cfg)),
        ("KV-producing layers", f"{cfg.n_kv_layers} of {cfg.n_layer}"
         + ("" if cfg.n_kv_layers == cfg.n_layer else f"  (kv_source {cfg.kv_sources})")),
        (f"KV bytes per token ({_cache_label(args)})", f"{info['kv_bytes_per_token']:,} "
         f"({format_bytes(info['kv_bytes_per_token'] * 1024)} per 1k tokens)"),
    ]
    if cfg.is_encoder_decoder:
        rows.insert(3, ("encoder", f"{cfg.n_encoder_layer} bidirectional MHA layers (not cached)"))
        rows.insert(4, ("cross-attention", f"{cfg.n_head} query, {cfg.cross_n_kv_head} KV heads, K/V from "
                                           f"{len(cfg.cross_kv_producers)} of {cfg.n_layer} decoder layers"
                        + ("" if cfg.cross_cla == 1 else f" (cross_cla {cfg.cross_cla})")))
        rows.append((f"cross-attention bytes per source token ({args.dtype})",
                     f"{cost.per_source_token:,}, computed once per source and kept while decoding"))
    rows += _cache_rows(cost, args)
    details = [_layer_details(cfg, i) for i in range(cfg.n_layer)]
    if cfg.attention_layers is not None or cfg.kinds != [DEFAULT_KIND] or any(details):
        rows.insert(4, ("attention per layer", ", ".join(
            s.kind + (f"({', '.join(d)})" if d else "") for s, d in zip(cfg.layer_specs, details))))
    return rows


def _cache_rows(cost, args: argparse.Namespace) -> list[tuple[str, str]]:
    """What a sequence holds beside the bytes per token: fixed, windowed and pooled caches."""
    rows = []
    if cost.per_sequence:
        rows.append((f"cache bytes per sequence ({_cache_label(args)})",
                     f"{cost.per_sequence:,} (fixed, whatever the length)"))
    if cost.bounded:
        rows.append((f"rolling window caches ({args.dtype})",
                     f"{sum(r * c for r, c in cost.bounded):,} bytes per sequence at most ("
                     + ", ".join(f"{c} tokens x {r:,} B" for r, c in cost.bounded[:4])
                     + (", ..." if len(cost.bounded) > 4 else "") + "): they stop growing at their windows"))
    if cost.pooled:
        rows.append((f"compressed memory ({args.dtype} window, fp32 sums)", ", ".join(
            f"{r:,} B per {c} tokens" for r, c in cost.pooled[:4]) + (", ..." if len(cost.pooled) > 4 else "")
            + ": one summary slot per block of older tokens"))
    return rows


def _layer_details(cfg, layer: int) -> list[str]:
    """What restricts a layer's view: its window, sinks and block-sparse layout."""
    from kvlab.attention.gqa import layer_sparse

    out = []
    if cfg.layer_window(layer) is not None:
        out.append(f"window {cfg.layer_window(layer)}")
    if cfg.layer_sinks(layer):
        out.append(f"sinks {cfg.layer_sinks(layer)}")
    if cfg.layer_sparse(layer) is not None:
        out.append(layer_sparse(cfg, layer).describe())
    if "block" in cfg.layer_specs[layer].options:
        out.append(f"summary per {cfg.layer_specs[layer].options['block']} older tokens")
    return out


def _cache_label(args: argparse.Namespace) -> str:
    return args.dtype if args.kv_quant == "none" else f"{args.kv_quant} K/V, {args.dtype} otherwise"


def _heads(cfg) -> str:
    """What each kind's layers hold, as the kind describes them ('; '-separated in a hybrid)."""
    from kvlab.registry import get_kind

    specs = cfg.layer_specs
    parts = []
    for name in cfg.kinds:
        layers = [i for i, s in enumerate(specs) if s.kind == name]
        text = get_kind(name).layer_description(cfg, layers)
        parts.append(text if len(cfg.kinds) == 1 else f"{name} layers: {text}")
    return "; ".join(parts)

"""``kvlab plan``: KV memory and the largest batch per KV variant."""

from __future__ import annotations

import argparse
import json

from kvlab.cli.common import UsageError, add_model_source, make_console, model_config_from_args


def _relative(value: int, base: int) -> str:
    if value == base:
        return "-"
    return f"{base / value:.2f}x smaller" if value < base else f"{value / base:.2f}x larger"



def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="KV memory and the largest batch per KV variant",
                       description="For a model and its MHA/GQA/MQA/CLA variants: KV bytes per token, KV "
                                   "memory per sequence and the largest batch that fits the memory "
                                   "after the weights.")
    add_model_source(p)
    p.add_argument("--memory", default="24GiB", help="accelerator memory, e.g. 24GiB, 80GB (default 24GiB)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--source-len", type=int, metavar="N",
                   help="an encoder–decoder: source tokens per sequence, whose cross-attention K/V are kept "
                        "while decoding (default: --context)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.eval.plan import format_bytes, parse_size, plan, plan_as_dicts

    cfg = model_config_from_args(args)
    memory = parse_size(args.memory)
    quant = None if args.kv_quant == "none" else args.kv_quant
    if args.source_len is not None and not cfg.is_encoder_decoder:
        raise UsageError("kvlab plan: --source-len is an encoder–decoder's source length; this model is decoder-only")
    rows = plan(cfg, memory, args.context, args.dtype, quant, args.source_len)
    # With a quantized cache, the batch each variant gets without it: the planner's batch gain.
    plain = {r.variant: r.max_batch for r in plan(cfg, memory, args.context, args.dtype, None, args.source_len)} \
        if quant else {}
    if args.json:
        variants = plan_as_dicts(rows)
        for v in variants:
            if quant:
                v["max_batch_unquantized"] = plain[v["variant"]]
        print(json.dumps({"model": cfg.name, "memory_bytes": memory, "context": args.context,
                          "dtype": args.dtype, "kv_quant": args.kv_quant, "variants": variants}, indent=2))
        return 0
    from rich.table import Table

    source = "" if not cfg.is_encoder_decoder else \
        f" (and cross-attention K/V of {args.source_len or args.context:,} source tokens)"
    table = Table(title=f"{cfg.name or 'model'}: KV cache at {args.context:,} tokens of context{source}, "
                        f"{format_bytes(memory)} memory, {args.dtype}"
                        + (f", {quant} KV cache" if quant else ""))
    columns = [("variant", "left"), ("KV heads", "right"), ("KV layers", "right"), ("params", "right"),
               ("weights", "right"), ("KV bytes/token", "right"), ("KV / sequence", "right"), ("max batch", "right"),
               ("vs model", "right")]
    if quant:
        columns.append((f"batch vs {args.dtype} KV", "right"))
    for col, justify in columns:
        table.add_column(col, justify=justify)
    base = next(r for r in rows if r.is_model)
    for r in rows:
        cells = [("* " if r.is_model else "  ") + r.variant, str(r.n_kv_head), str(r.n_kv_layers),
                 f"{r.params / 1e6:,.1f}M", format_bytes(r.weight_bytes), f"{r.kv_bytes_per_token:,}",
                 format_bytes(r.kv_bytes_per_sequence),
                 f"{r.max_batch:,}" if r.max_batch else _why_none(r, memory),
                 # per sequence at this context: the same ratio as per token for caches that
                 # grow, and the honest one for windows and fixed states
                 _relative(r.kv_bytes_per_sequence, base.kv_bytes_per_sequence)]
        if quant:
            cells.append(f"{r.max_batch / plain[r.variant]:.2f}x" if plain[r.variant] else "-")
        table.add_row(*cells)
    console = make_console()
    console.print(table)
    console.print("* = this model. max batch = (memory - weights) // KV per sequence; activations "
                  "and allocator overhead are not counted.")
    if cfg.max_seq_len < args.context:
        console.print(f"note: context {args.context} exceeds the model's max_seq_len {cfg.max_seq_len}")
    return 0


def _why_none(row, memory: int) -> str:
    """Why not even one sequence fits: the weights alone, or one sequence's KV beside them."""
    if row.weight_bytes >= memory:
        return "0 (weights do not fit)"
    return "0 (one sequence's KV won't fit)"

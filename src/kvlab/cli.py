"""The ``kvlab`` command.

Exit codes: 0 success, 2 usage error (bad flag or impossible configuration; one line on
stderr), 1 failure (a file that cannot be read, a run that breaks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from kvlab.errors import ConfigError, KvlabError


class UsageError(KvlabError):
    """Bad command-line usage: exit 2 with one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------- model source
def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (give one)")
    src.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT_DIR", help="a kvlab checkpoint directory")
    src.add_argument("--preset", metavar="NAME", help="a built-in preset (kvlab info --list-presets)")
    src.add_argument("--config", metavar="FILE", help="a JSON file of ModelConfig fields")
    p.add_argument("--n-kv-head", type=int, metavar="N", help="override the number of KV heads (1 = MQA)")
    p.add_argument("--cla", type=int, metavar="K", help="override the cross-layer KV sharing factor")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"],
                   help="dtype of the KV cache and weights for byte counts (default bf16)")
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")


def _model_config(args: argparse.Namespace):
    from kvlab.config import ModelConfig

    given = [x for x in (args.checkpoint, args.preset, args.config) if x]
    if len(given) != 1:
        raise UsageError(f"kvlab {args.verb}: give exactly one of CHECKPOINT_DIR, --preset NAME or "
                         f"--config FILE (got {len(given)})")
    if args.preset:
        cfg = ModelConfig.from_preset(args.preset)
    elif args.config:
        cfg = ModelConfig.from_json(args.config)
    else:
        from kvlab.checkpoints.kvlab_format import read_config

        cfg = read_config(args.checkpoint)
    changes = {}
    if args.n_kv_head is not None:
        changes["n_kv_head"] = args.n_kv_head
    if args.cla is not None:
        changes["cla"] = args.cla
    return cfg.replace(**changes) if changes else cfg


def _console():
    from rich.console import Console

    # Not a terminal (pipes, CI, tests): wide enough that tables never wrap.
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


# ----------------------------------------------------------------------------------- verbs
def cmd_info(args: argparse.Namespace) -> int:
    from kvlab.config import PRESETS
    from kvlab.plan import format_bytes, kv_label

    if args.list_presets:
        for name in PRESETS:
            print(name)
        return 0
    cfg = _model_config(args)
    counts = cfg.param_counts()
    info = {
        "name": cfg.name, "variant": kv_label(cfg), "params": counts["total"],
        "attention_params": counts["attention"], "n_layer": cfg.n_layer, "d_model": cfg.d_model,
        "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "n_kv_layers": cfg.n_kv_layers, "kv_sources": cfg.kv_sources, "dtype": args.dtype,
        "kv_bytes_per_token": cfg.kv_bytes_per_token(args.dtype),
        "param_counts": counts,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("model", f"{cfg.name or '(custom)'}  [{info['variant']}]"),
        ("parameters", f"{counts['total']:,} (attention {counts['attention']:,}, mlp {counts['mlp']:,}, "
                       f"embedding {counts['embedding']:,})"),
        ("layers", f"{cfg.n_layer} x d_model {cfg.d_model}, {cfg.block} blocks, {cfg.mlp}, {cfg.norm}, {cfg.pos}"),
        ("heads", f"{cfg.n_head} query, {cfg.n_kv_head} KV (group {cfg.q_per_kv}), head_dim {cfg.head_dim}"),
        ("KV-producing layers", f"{cfg.n_kv_layers} of {cfg.n_layer}"
         + ("" if cfg.n_kv_layers == cfg.n_layer else f"  (kv_source {cfg.kv_sources})")),
        (f"KV bytes per token ({args.dtype})", f"{info['kv_bytes_per_token']:,} "
         f"({format_bytes(info['kv_bytes_per_token'] * 1024)} per 1k tokens)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _relative(value: int, base: int) -> str:
    if value == base:
        return "-"
    return f"{base / value:.2f}x smaller" if value < base else f"{value / base:.2f}x larger"


def cmd_plan(args: argparse.Namespace) -> int:
    from kvlab.plan import format_bytes, parse_size, plan, plan_as_dicts

    cfg = _model_config(args)
    memory = parse_size(args.memory)
    rows = plan(cfg, memory, args.context, args.dtype)
    if args.json:
        print(json.dumps({"model": cfg.name, "memory_bytes": memory, "context": args.context,
                          "dtype": args.dtype, "variants": plan_as_dicts(rows)}, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{cfg.name or 'model'}: KV cache at {args.context:,} tokens of context, "
                        f"{format_bytes(memory)} memory, {args.dtype}")
    for col, justify in (("variant", "left"), ("KV heads", "right"), ("KV layers", "right"),
                         ("params", "right"), ("weights", "right"), ("KV bytes/token", "right"),
                         ("KV / sequence", "right"), ("max batch", "right"), ("vs model", "right")):
        table.add_column(col, justify=justify)
    base = next(r for r in rows if r.is_model)
    for r in rows:
        table.add_row(("* " if r.is_model else "  ") + r.variant, str(r.n_kv_head), str(r.n_kv_layers),
                      f"{r.params / 1e6:,.1f}M", format_bytes(r.weight_bytes), f"{r.kv_bytes_per_token:,}",
                      format_bytes(r.kv_bytes_per_sequence),
                      f"{r.max_batch:,}" if r.max_batch else "0 (weights do not fit)",
                      _relative(r.kv_bytes_per_token, base.kv_bytes_per_token))
    console = _console()
    console.print(table)
    console.print("* = this model. max batch = (memory - weights) // KV per sequence; activations "
                  "and allocator overhead are not counted.")
    if cfg.max_seq_len < args.context:
        console.print(f"note: context {args.context} exceeds the model's max_seq_len {cfg.max_seq_len}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from kvlab.checkpoints import load_checkpoint
    from kvlab.generation import generate

    if args.prompt is None and args.prompt_ids is None:
        raise UsageError("kvlab generate: give --prompt TEXT or --prompt-ids 1,2,3")
    model = load_checkpoint(args.checkpoint, device=args.device)
    tok = model.tokenizer
    if args.prompt is not None:
        if tok is None:
            raise UsageError(f"kvlab generate: {args.checkpoint} has no tokenizer; pass --prompt-ids instead")
        prompts = [tok.encode(p) for p in args.prompt]
    else:
        try:
            prompts = [[int(t) for t in ids.split(",")] for ids in args.prompt_ids]
        except ValueError:
            raise UsageError(f"kvlab generate: --prompt-ids {args.prompt_ids} must be comma-separated "
                             f"integers such as 1,2,3") from None
    stop = args.stop_token if args.stop_token else None
    stream = len(prompts) == 1 and not args.json
    shown: list[int] = []
    text_so_far = ""

    def on_token(row: int, token: int) -> None:
        nonlocal text_so_far
        shown.append(token)
        if tok is None:
            print(token, end=" ", flush=True)
        else:  # decode everything so far: multi-byte characters may span several tokens
            text = tok.decode(shown)
            print(text[len(text_so_far):], end="", flush=True)
            text_so_far = text

    if stream and args.prompt is not None:
        print(args.prompt[0], end="", flush=True)
    with torch.inference_mode():
        outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop_tokens=stop, backend=args.backend,
                        on_token=on_token if stream else None)
    if stream:
        print()
    if args.json:
        print(json.dumps([{"prompt_ids": p, "new_ids": o, "text": tok.decode(o) if tok else None}
                          for p, o in zip(prompts, outs)], indent=2))
    elif not stream:
        for i, (p, o) in enumerate(zip(prompts, outs)):
            print(f"[{i}] " + (tok.decode(p) + tok.decode(o) if tok else " ".join(map(str, p + o))))
    return 0


# ---------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvlab", description="Transformer LMs with small, fast KV caches.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", help="parameters, heads and KV bytes per token of a model",
                       description="Show a model's shape, parameter counts and KV bytes per token.")
    _add_model_source(p)
    p.add_argument("--list-presets", action="store_true", help="list the built-in presets and exit")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="KV memory and the largest batch per KV variant",
                       description="For a model and its MHA/GQA/MQA/CLA variants: KV bytes per token, KV "
                                   "memory per sequence and the largest batch that fits the memory "
                                   "after the weights.")
    _add_model_source(p)
    p.add_argument("--memory", default="24GiB", help="accelerator memory, e.g. 24GiB, 80GB (default 24GiB)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="generate text from a checkpoint",
                       description="Generate from a kvlab checkpoint: prefill, then decode with the KV cache.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", metavar="IDS", help="a prompt as token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="makes sampling deterministic")
    p.add_argument("--stop-token", type=int, action="append", help="token id that ends a row (default EOS)")
    p.add_argument("--backend", help="attention backend (reference, sdpa, auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print prompts and outputs as JSON")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except (UsageError, ConfigError) as e:
        print(f"error: {e}" if not str(e).startswith("kvlab") else str(e), file=sys.stderr)
        return 2
    except KvlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

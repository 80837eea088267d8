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
    src.add_argument("checkpoint", nargs="?", metavar="MODEL",
                     help="a kvlab or HF checkpoint directory, a .gguf file, or a built-in name (smollm2-135m)")
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
        raise UsageError(f"kvlab {args.verb}: give exactly one of MODEL, --preset NAME or "
                         f"--config FILE (got {len(given)})")
    if args.preset:
        cfg = ModelConfig.from_preset(args.preset)
    elif args.config:
        cfg = ModelConfig.from_json(args.config)
    else:
        from kvlab.checkpoints import load_config

        cfg = load_config(args.checkpoint)
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


def _load_model(args: argparse.Namespace):
    from kvlab.checkpoints import load
    from kvlab.dtypes import parse_dtype

    dtype = parse_dtype(args.model_dtype) if getattr(args, "model_dtype", None) else None
    model = load(args.model, dtype=dtype, device=args.device)
    if getattr(args, "adapter", None):
        from kvlab.peft import load_adapter

        load_adapter(model, args.adapter)
    return model


def cmd_generate(args: argparse.Namespace) -> int:
    from kvlab.generation import generate

    if args.prompt is None and args.prompt_ids is None:
        raise UsageError("kvlab generate: give --prompt TEXT or --prompt-ids 1,2,3")
    model = _load_model(args)
    tok = model.tokenizer
    if args.prompt is not None:
        if tok is None:
            raise UsageError(f"kvlab generate: {args.model} has no tokenizer; pass --prompt-ids instead")
        if args.chat:
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in args.prompt]
        else:
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
        else:  # decode everything so far: a character may span several tokens
            text = tok.decode(shown, skip_special_tokens=True)
            print(text[len(text_so_far):], end="", flush=True)
            text_so_far = text

    if stream and args.prompt is not None and not args.chat:
        print(args.prompt[0], end="", flush=True)
    outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop_tokens=stop, backend=args.backend,
                    on_token=on_token if stream else None)
    if stream:
        print()
    if args.json:
        print(json.dumps([{"prompt_ids": p, "new_ids": o, "text": tok.decode(o, skip_special_tokens=True) if tok else None}
                          for p, o in zip(prompts, outs)], indent=2))
    elif not stream:
        for i, (p, o) in enumerate(zip(prompts, outs)):
            print(f"[{i}] " + (tok.decode(o, skip_special_tokens=True) if tok else " ".join(map(str, p + o))))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kvlab.corpus import corpus_fingerprint, read_documents
    from kvlab.evaluate import evaluate

    docs = read_documents(args.data)
    model = _load_model(args)
    result = evaluate(model, model.tokenizer, docs, seq_len=args.seq_len, stride=args.stride,
                      max_tokens=args.max_tokens, batch_size=args.batch_size, progress=not args.no_progress,
                      backend=args.backend)
    out = {"model": str(args.model), "data": args.data, "data_fingerprint": corpus_fingerprint(docs),
           "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token("bf16"), **result.to_dict()}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model} on {args.data}: perplexity {result.perplexity:.3f}, {result.bits_per_byte:.4f} "
              f"bits/byte, {result.tokens:,} tokens ({result.bytes:,} bytes, {result.documents} documents), "
              f"windows of {result.seq_len} with stride {result.stride}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from kvlab.checkpoints import load_config
    from kvlab.convert import convert, plan_conversion

    if args.kv_heads is None and not args.mqa and args.cla is None:
        raise UsageError("kvlab convert: give --kv-heads G, --mqa and/or --cla K")
    if args.kv_heads is not None and args.mqa:
        raise UsageError("kvlab convert: give --kv-heads G or --mqa, not both")
    change = dict(n_kv_head=1 if args.mqa else args.kv_heads, cla=args.cla, method=args.method)
    plan_conversion(load_config(args.model), **change)          # fail before loading any weights
    model = _load_model(args)
    before = model.cfg
    new = convert(model, seed=args.seed, **change)
    new.save(args.output)
    print(f"{args.model} -> {args.output}: {before.n_kv_head} -> {new.cfg.n_kv_head} KV heads, "
          f"{before.n_kv_layers} -> {new.cfg.n_kv_layers} KV layers ({args.method}); KV bytes per token (bf16) "
          f"{before.kv_bytes_per_token('bf16'):,} -> {new.cfg.kv_bytes_per_token('bf16'):,}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kvlab.checkpoints.hf import config_to_hf, export_hf
    from kvlab.checkpoints import load_config
    from kvlab.dtypes import parse_dtype

    if args.format == "hf":  # fail on an unexportable architecture before loading any weights
        config_to_hf(load_config(args.model), parse_dtype(args.dtype or "fp32"))
    model = _load_model(args)
    if args.format == "hf":
        export_hf(model, args.output, dtype=parse_dtype(args.dtype) if args.dtype else None)
    else:
        if args.dtype:
            model = model.to(parse_dtype(args.dtype))
        model.save(args.output)
    print(f"wrote {args.format} checkpoint {args.output}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from kvlab.corpus import builtin_corpus, read_documents
    from kvlab.data import Windows, tokenize_to_file
    from kvlab.model import Transformer
    from kvlab.tokenizer import ByteTokenizer
    import torch

    from kvlab.train import Dist, TrainConfig, full_model_state, steps_for_budget, train

    sources = [x for x in (args.preset, args.config, args.init) if x]
    if len(sources) != 1:
        raise UsageError("kvlab train: give exactly one of --preset NAME, --config FILE (pretraining) or "
                         "--init MODEL (uptraining a checkpoint)")
    budgets = [b for b, given in (("--max-steps", args.max_steps is not None), ("--tokens", args.tokens is not None),
                                  ("--alpha", args.alpha is not None)) if given]
    if len(budgets) != 1:
        raise UsageError(f"kvlab train: give exactly one budget: --max-steps N, --tokens N, or --alpha A with "
                         f"--reference-tokens N (got {', '.join(budgets) or 'none'})")
    tokens_per_step = args.batch_size * args.seq_len
    max_steps = args.max_steps if args.max_steps is not None else steps_for_budget(
        tokens_per_step, tokens=args.tokens, alpha=args.alpha, reference_tokens=args.reference_tokens)
    cfg = TrainConfig(out_dir=args.out, max_steps=max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      seq_len=args.seq_len, lr=args.lr, warmup_steps=min(args.warmup_steps, max_steps),
                      eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
                      keep_last=args.keep_last, seed=args.seed, train_only=args.train_only,
                      data_mode=args.data_mode, log_every=args.log_every)
    if args.init:
        model = _load_model(argparse.Namespace(model=args.init, model_dtype=None, device="cpu"))
        tokenizer = model.tokenizer
    else:
        ns = argparse.Namespace(checkpoint=None, preset=args.preset, config=args.config, n_kv_head=args.n_kv_head,
                                cla=args.cla, verb="train")
        model_cfg = _model_config(ns)
        tokenizer = ByteTokenizer()
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise UsageError(f"kvlab train: a model trained from scratch uses kvlab's byte tokenizer "
                             f"({tokenizer.vocab_size} ids); vocab_size={model_cfg.vocab_size} is too small")
        torch_seed(args.seed)
        model = Transformer(model_cfg)
        model.tokenizer = tokenizer
    if tokenizer is None:
        raise UsageError(f"kvlab train: {args.init} has no tokenizer to read the data with")
    if args.data in ("builtin", "builtin:train"):
        train_docs, val_docs = builtin_corpus("train"), builtin_corpus("validation")
    else:
        docs = read_documents(args.data, field=args.data_field)
        train_docs = [d for d in docs if d.split == "train"] or docs
        val_docs = [d for d in docs if d.split == "validation"]
    train_tokens = tokenize_to_file(train_docs, tokenizer, cache_dir=args.cache_dir).tokens
    val_tokens = tokenize_to_file(val_docs, tokenizer, cache_dir=args.cache_dir).tokens if val_docs else None
    device = torch.device(args.device)
    dist_ctx = Dist.from_env(args.strategy, device)
    if dist_ctx.enabled and device.type == "cuda":
        import os

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    shard = dict(rank=dist_ctx.rank, world_size=dist_ctx.world_size)
    train_windows = Windows(train_tokens, cfg.seq_len, cfg.batch_size, mode=cfg.data_mode, seed=cfg.seed, **shard)
    val_windows = (Windows(val_tokens, cfg.seq_len, cfg.batch_size, mode="sequential", seed=cfg.seed, **shard)
                   if val_tokens is not None and len(val_tokens) > cfg.seq_len + 1 else None)
    summary = train(model, train_windows, val_windows, cfg, resume=args.resume, device=device, dist_ctx=dist_ctx)
    prov = getattr(model, "provenance", None) or {"source": {"kind": "init", "config": model.cfg.name}, "steps": []}
    step = {"op": "train", "steps": max_steps, "tokens": max_steps * tokens_per_step, "data": args.data,
            "train_only": args.train_only, "lr": args.lr, "seed": args.seed}
    if args.alpha is not None:
        step.update(alpha=args.alpha, reference_tokens=args.reference_tokens)
    if dist_ctx.enabled:
        step.update(world_size=dist_ctx.world_size, strategy=dist_ctx.strategy)
    model.provenance = {**prov, "steps": [*prov.get("steps", []), step]}
    final = Path(args.out) / "final"
    state = full_model_state(model, dist_ctx)                # collective under FSDP
    if dist_ctx.is_main:
        model.save(final, state_dict=state)
        print(json.dumps({"final": str(final), **{k: v for k, v in summary.items() if k != "start_step"}}))
    dist_ctx.barrier()
    if dist_ctx.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from kvlab.finetune import finetune
    from kvlab.peft import LORA_FAMILY, AdapterSpec
    from kvlab.sft import ChatBatches, read_chat_jsonl
    from kvlab.train import TrainConfig

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise UsageError(f"kvlab finetune: --out {out} is not empty; choose a new directory or pass --resume")
    if args.method in LORA_FAMILY:
        options = dict(alpha=args.alpha, dropout=args.dropout, target_modules=args.target_modules.split(","))
        if args.method == "adalora":
            options.update(init_r=args.init_r, target_r=args.r)
        else:
            options.update(r=args.r, rslora=args.rslora)
    else:
        options = dict(num_virtual_tokens=args.virtual_tokens)
        if args.method == "prefix":
            options["reparam_hidden"] = args.reparam_hidden
    spec = AdapterSpec(args.method, options)
    train_convs = read_chat_jsonl(args.data)
    eval_convs = read_chat_jsonl(args.eval_data)[:args.eval_limit] if args.eval_data else None
    if args.max_steps is None and args.epochs is None:
        raise UsageError("kvlab finetune: give --max-steps N or --epochs E")
    model = _load_model(args)
    if model.tokenizer is None:
        raise UsageError(f"kvlab finetune: {args.model} has no tokenizer to render the chat data with")
    batches = ChatBatches(train_convs, model.tokenizer, args.seq_len, args.batch_size, pack=args.pack, seed=args.seed)
    max_steps = args.max_steps
    if max_steps is None:
        max_steps = max(1, round(args.epochs * len(batches.rows) / args.batch_size))
    cfg = TrainConfig(out_dir=str(out), max_steps=max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      seq_len=args.seq_len, lr=args.lr, warmup_steps=min(args.warmup_steps, max_steps),
                      weight_decay=0.0, eval_every=max_steps, save_every=args.save_every, keep_last=args.keep_last,
                      log_every=args.log_every, seed=args.seed, train_only="adapter")
    torch_seed(args.seed)
    summary = finetune(model, model.tokenizer, spec, batches, cfg, eval_conversations=eval_convs,
                       merge=args.merge, resume=args.resume, device=args.device)
    keys = ("method", "trainable_parameters", "first_loss", "final_loss", "seconds_per_step", "peak_memory_bytes",
            "base_weight_memory", "adapter", "peft", "merged")
    brief = {k: summary[k] for k in keys if k in summary}
    for k in ("accuracy_before", "accuracy_after"):
        if k in summary:
            brief[k] = summary[k]["accuracy"]
    print(json.dumps(brief))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from kvlab.instruct import write_task_files

    paths = write_task_files(args.out, n_train=args.train, n_test=args.test, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def _numbers(kind, what: str):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
    return parse


def cmd_study(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from kvlab.study import StudyConfig, run_study
    from kvlab.study_report import table_rows

    if args.replot:
        from kvlab.study_report import rerender

        results = rerender(args.replot)
    else:
        given = {f.name: getattr(args, f.name) for f in fields(StudyConfig)
                 if getattr(args, f.name, None) is not None}
        cfg = StudyConfig.make(quick=args.quick, **given)
        results = run_study(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    from rich.table import Table

    head, rows = table_rows(results)
    table = Table(title=f"kvlab study ({results['meta']['seconds']:,.0f} s)")
    for i, col in enumerate(head):
        table.add_column(col, justify="left" if i < 4 else "right")
    for r in rows:
        table.add_row(*r)
    console = _console()
    console.print(table)
    out = results["meta"]["out_dir"]
    console.print(f"report: {out}/report.md   plots: {out}/pareto.png, {out}/uptraining.png, "
                  f"{out}/loss_curves.png   data: {out}/results.json")
    return 0


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


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

    def model_args(p: argparse.ArgumentParser, adapter: bool = False) -> None:
        p.add_argument("model", metavar="MODEL",
                       help="a kvlab or HF checkpoint directory, a .gguf file, or a built-in name (smollm2-135m)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--model-dtype", choices=["fp32", "bf16", "fp16"],
                       help="load the weights in this dtype (default: fp32 for imports, stored for kvlab)")
        if adapter:    # where the adapted model is only run (finetune attaches its own; export/convert refuse)
            p.add_argument("--adapter", metavar="DIR", help="a kvlab adapter (from kvlab finetune) to apply to MODEL")

    p = sub.add_parser("generate", help="generate text from a model",
                       description="Generate from a model: prefill, then decode with the KV cache.")
    model_args(p, adapter=True)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", metavar="IDS", help="a prompt as token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="makes sampling deterministic")
    p.add_argument("--stop-token", type=int, action="append", help="token id that ends a row (default EOS)")
    p.add_argument("--backend", help="attention backend: reference, sdpa, flash, triton or auto (default: the model's)")
    p.add_argument("--json", action="store_true", help="print prompts and outputs as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity and bits per byte on a corpus",
                       description="Perplexity and bits per byte. Documents are scored separately, each after "
                                   "one BOS/EOS context token, long ones in windows of --seq-len tokens advancing "
                                   "by --stride, every token scored once.")
    model_args(p, adapter=True)
    p.add_argument("--data", default="builtin", help="'builtin' (validation split), 'builtin:train', a text "
                                                     "file, a .jsonl file (field 'text') or a directory of .txt")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stride", type=int, help="window advance (default seq-len / 2)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--backend", help="attention backend: reference, sdpa, flash, triton or auto (default: the model's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="MHA/GQA -> fewer KV heads and/or cross-layer KV sharing",
                       description="Convert a model's K/V heads by pooling contiguous groups (GQA/MQA) and/or "
                                   "share KV across layers (CLA); writes a kvlab checkpoint with provenance.")
    model_args(p)
    p.add_argument("--kv-heads", type=int, metavar="G", help="new number of KV heads (must divide the current)")
    p.add_argument("--mqa", action="store_true", help="one KV head (same as --kv-heads 1)")
    p.add_argument("--cla", type=int, metavar="K", help="share each producer's KV with the next K-1 layers")
    p.add_argument("--method", choices=["mean", "first", "random"], default="mean")
    p.add_argument("--seed", type=int, default=0, help="seed of --method random")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="pretrain from a config, or uptrain a checkpoint",
                       description="Train with AdamW, warm-up + cosine decay, gradient clipping and exact resume "
                                   "from atomic checkpoints. Pretrain a --preset/--config (byte tokenizer) or "
                                   "uptrain --init MODEL, e.g. the output of kvlab convert.")
    src = p.add_argument_group("model (give one)")
    src.add_argument("--preset", metavar="NAME")
    src.add_argument("--config", metavar="FILE")
    src.add_argument("--init", metavar="MODEL", help="a checkpoint to continue training (uptraining)")
    p.add_argument("--n-kv-head", type=int, help="with --preset/--config: override KV heads")
    p.add_argument("--cla", type=int, help="with --preset/--config: override the CLA sharing factor")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: metrics.jsonl, checkpoints/, final/")
    p.add_argument("--data", default="builtin", help="'builtin', a text file, a .jsonl file or a directory of .txt")
    p.add_argument("--data-field", default="text", help="the JSONL field holding the text (default 'text')")
    budget = p.add_argument_group("budget (give one)")
    budget.add_argument("--max-steps", type=int)
    budget.add_argument("--tokens", type=int, help="training tokens")
    budget.add_argument("--alpha", type=float, help="a fraction of --reference-tokens (uptraining budget)")
    budget.add_argument("--reference-tokens", type=int, help="the pretraining budget --alpha refers to")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-only", choices=["all", "attention", "kv"], default="all")
    p.add_argument("--data-mode", choices=["random", "sequential"], default="random")
    p.add_argument("--cache-dir", help="where tokenized data is cached (default ~/.cache/kvlab or $KVLAB_CACHE)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: DDP, or FSDP2 (fully_shard per block)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("study", help="the KV-cache study: pretrain, convert, uptrain, compare (the main job)",
                       description="Pretrain a small MHA model on the built-in corpus, convert it to GQA/MQA/CLA2/"
                                   "MQA-CLA2 (mean; MQA also first/random), evaluate at alpha=0 and after "
                                   "uptraining, train every variant from scratch, and measure perplexity, KV "
                                   "bytes, max batch and decode speed. With --model: conversions and uptraining "
                                   "of that checkpoint. Writes results.json, report.md and plots. Defaults take "
                                   "about 15 minutes on 2 CPU cores; --quick about 2.")
    p.add_argument("--model", help="study this checkpoint or built-in model (e.g. smollm2-135m) instead of "
                                   "pretraining one")
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets (every step, a few minutes)")
    p.add_argument("--out", dest="out_dir", metavar="DIR", help="output directory (default runs/study-<time>)")
    p.add_argument("--replot", metavar="DIR", help="only rewrite the plots and report.md of a finished study")
    g = p.add_argument_group("the pretrained model (without --model)")
    for flag in ("d-model", "n-layer", "n-head", "d-ff"):
        g.add_argument(f"--{flag}", type=int)
    g.add_argument("--pretrain-tokens", type=int, help="P: the pretraining and from-scratch budget")
    g.add_argument("--lr", type=float, help="peak learning rate of pretraining (default 3e-3)")
    g.add_argument("--gqa-heads", type=_numbers(int, "head counts"), help="GQA targets, e.g. 4,2")
    g.add_argument("--alphas", type=_numbers(float, "fractions"), help="uptraining budgets, fractions of P "
                                                                       "(default 0.05)")
    g.add_argument("--mqa-alphas", type=_numbers(float, "fractions"), help="MQA's budgets (default 0.05,0.1)")
    g.add_argument("--no-from-scratch", dest="from_scratch", action="store_false", default=None,
                   help="skip step 3 (training every variant from scratch)")
    g = p.add_argument_group("uptraining and measurement")
    g.add_argument("--uptrain-tokens", type=_numbers(int, "token counts"),
                   help="with --model: uptraining budgets in tokens (default 4096)")
    g.add_argument("--uptrain-lr", type=float, help="peak lr of uptraining (default: --lr / 3, or 1e-4 with --model)")
    g.add_argument("--ablation-uptrain", action="store_true", default=None,
                   help="uptrain the MQA first/random conversions too (default without --model)")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--eval-tokens", type=int, help="validation tokens scored per model")
    g.add_argument("--decode-batch", type=int)
    g.add_argument("--decode-context", type=int)
    g.add_argument("--decode-steps", type=int)
    g.add_argument("--plan-memory", help="memory budget of the max-batch column (default 24GiB)")
    g.add_argument("--plan-context", type=int, help="context of the max-batch column (default 8192)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--keep-checkpoints", action="store_true", default=None,
                   help="keep every run's final checkpoint (default: only the pretrained model)")
    p.add_argument("--verbose", action="store_true", default=None, help="training progress lines")
    p.add_argument("--cache-dir", help="where tokenized data is cached")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("finetune", help="fine-tune an adapter (LoRA, QLoRA, AdaLoRA, prefix, P-tuning v2, prompt) "
                                        "on chat data",
                       description="Supervised fine-tuning on chat JSONL ({\"messages\": [...]} per line) with the "
                                   "model's chat template and the loss on assistant tokens only. Writes OUT/adapter "
                                   "(kvlab), OUT/peft (HF PEFT, LoRA family), OUT/merged (--merge) and "
                                   "OUT/summary.json; checkpoints for --resume.")
    model_args(p)
    p.add_argument("--method", required=True, choices=["lora", "qlora", "adalora", "prefix", "ptuning", "prompt"])
    p.add_argument("--data", required=True, metavar="FILE", help="chat JSONL to train on (kvlab tasks writes one)")
    p.add_argument("--eval-data", metavar="FILE", help="held-out chat JSONL: exact-match accuracy before and after")
    p.add_argument("--eval-limit", type=int, help="score at most this many held-out conversations")
    p.add_argument("--out", required=True, metavar="DIR")
    budget = p.add_argument_group("budget (give one)")
    budget.add_argument("--max-steps", type=int)
    budget.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256, help="row length; longer conversations are truncated")
    p.add_argument("--pack", action="store_true", help="pack several conversations per row (segment-masked)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--merge", action="store_true", help="also write OUT/merged: LoRA/AdaLoRA folded into the base")
    lora = p.add_argument_group("LoRA / QLoRA / AdaLoRA")
    lora.add_argument("--r", type=int, default=8, help="rank (AdaLoRA: the target rank)")
    lora.add_argument("--init-r", type=int, default=12, help="AdaLoRA: the initial rank")
    lora.add_argument("--alpha", type=float, default=16.0)
    lora.add_argument("--dropout", type=float, default=0.0)
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    lora.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj",
                      help="comma-separated layer names or regular expressions over full names")
    prompt = p.add_argument_group("prefix / P-tuning v2 / prompt tuning")
    prompt.add_argument("--virtual-tokens", type=int, default=16)
    prompt.add_argument("--reparam-hidden", type=int, default=512, help="prefix tuning's MLP width")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("tasks", help="write the built-in instruction set (train.jsonl, test.jsonl)",
                       description="Deterministic chat tasks with checkable answers: addition, upper-casing, "
                                   "sorting, date formatting, maximum.")
    p.add_argument("out", metavar="DIR")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("export", help="write a model as a HF or kvlab checkpoint",
                       description="Export to HF transformers (LlamaForCausalLM; Qwen2/Mistral when biases or "
                                   "a sliding window need it) or to the kvlab format.")
    model_args(p)
    p.add_argument("--format", choices=["hf", "kvlab"], default="hf")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="dtype of the written weights")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=cmd_export)
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

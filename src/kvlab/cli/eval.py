"""``kvlab eval``: perplexity and bits per byte; with ``--original``, the fidelity to the model a model was
shrunk from; off-domain sets, passkey retrieval, kvlab's tasks and lm-evaluation-harness's."""

from __future__ import annotations

import argparse
import json

from kvlab.cli.common import UsageError, kv_quant_arg, load_model, model_args, number_list, positive_int
from kvlab.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per byte on a corpus",
                       description="Perplexity and bits per byte. Documents are scored separately, each after "
                                   "one BOS/EOS context token, long ones in windows of --seq-len tokens advancing "
                                   "by --stride, every token scored once.")
    model_args(p, adapter=True, window=True)
    p.add_argument("--data", help="'builtin' (the validation split; the default unless --passkey or --tasks is "
                                  "given), 'builtin:train', a text "
                                                     "file, a .jsonl file (text or chat records), a directory, a "
                                                     "glob; with ':validation' / ':train' after your own text, one "
                                                     "side of its held-out split (as shrink and train hold it out); "
                                                     "'offdomain': each off-domain set this machine ships (C "
                                                     "headers, manual pages, JavaScript, licence texts), scored "
                                                     "separately (--max-tokens of each, default 4,096)")
    p.add_argument("--original", metavar="MODEL",
                   help="also compare with this model (the original a model was shrunk from) on the same tokens: "
                        "perplexity ratio, mean KL(original || model) per token and top-1 agreement; the original "
                        "reads through a float cache")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stride", type=int, help="window advance (default seq-len / 2)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--batch-size", type=positive_int, default=4)
    kv_quant_arg(p)
    p.add_argument("--backend", help="attention backend: reference, sdpa, flash, triton or auto (default: the model's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--num-beams", type=positive_int, default=1,
                   help="an encoder–decoder: beam search for the exact-match accuracy (default 1: greedy)")
    p.add_argument("--passkey", action="store_true",
                   help="passkey retrieval: a five-digit key hidden in filler text at depths 0, 0.25, 0.5, 0.75 and "
                        "1, at --passkey-lengths (with --original: the original's beside)")
    p.add_argument("--passkey-lengths", type=number_list(int, "token counts"), metavar="N,N,...",
                   help="prompt lengths in tokens (default 1,024 doubling up to the model's trained context)")
    p.add_argument("--passkey-trials", type=positive_int, default=2, help="trials (keys) per length and depth")
    p.add_argument("--tasks", metavar="LIST",
                   help="tasks to score, comma-separated: kvlab's next-line (4-way multiple choice) and recall (exact "
                        "match), built from the off-domain text; any other name (hellaswag, arc_easy, …) or YAML path "
                        "runs through lm-evaluation-harness (pip install lm_eval; its datasets must be on the machine)")
    p.add_argument("--task-items", type=positive_int, default=200, help="items of each kvlab task")
    p.add_argument("--include-path", metavar="DIR", help="lm-eval task YAMLs to load as well (tasks over local files)")
    p.add_argument("--limit", type=positive_int, help="lm-eval: score at most this many documents per task")
    p.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples per prompt (default: the task's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _run_seq2seq(args: argparse.Namespace, model) -> int:
    """An encoder–decoder: target perplexity and exact-match accuracy on held-out pairs (the built-in
    tasks' test split, or every pair of a JSONL file), with the generation time per sample."""
    from kvlab.eval.seq2seq import exact_match, target_loss
    from kvlab.recipes.seq2seq import evaluation_pairs

    if args.kv_quant != "none" or getattr(args, "window", None) is not None:
        raise UsageError("kvlab eval: --kv-quant and --window are for decoder-only models")
    if args.passkey or args.tasks:
        raise UsageError("kvlab eval: --passkey and --tasks are for decoder-only models")
    args.data = args.data or "builtin"
    if model.tokenizer is None:
        raise UsageError(f"kvlab eval: {args.model} has no tokenizer to read the pairs with")
    try:
        pairs = evaluation_pairs(args.data)
    except ConfigError as e:
        raise UsageError(f"kvlab eval: {e}") from None
    if args.max_tokens is not None:
        pairs = pairs[:max(1, args.max_tokens // 32)]
    loss = target_loss(model, pairs, model.tokenizer, batch_size=args.batch_size)
    match = exact_match(model, pairs, model.tokenizer, num_beams=args.num_beams, batch_size=args.batch_size,
                        backend=args.backend)
    cost = model.cfg.cache_bytes("bf16")
    out = {"model": str(args.model), "data": args.data, "pairs": len(pairs), **loss,
           **{k: match[k] for k in ("accuracy", "per_task", "num_beams", "seconds_per_sample", "samples")},
           "kv_bytes_per_token_bf16": cost.per_token, "cross_bytes_per_source_token_bf16": cost.per_source_token}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model} on {args.data}: target perplexity {loss['perplexity']:.3f} over {loss['target_tokens']:,} "
              f"target tokens of {len(pairs):,} pairs; exact match {match['accuracy']:.1%} "
              f"({'beam ' + str(args.num_beams) if args.num_beams > 1 else 'greedy'}, "
              f"{match['seconds_per_sample'] * 1e3:.1f} ms per sample)")
    return 0


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    if model.cfg.is_encoder_decoder:
        return _run_seq2seq(args, model)
    if args.num_beams > 1:
        raise UsageError("kvlab eval: --num-beams scores an encoder–decoder's generated targets; this model is "
                         "decoder-only")
    original = None
    if args.original:           # loaded before any scoring, so that a wrong path fails at once
        from kvlab.recipes.loading import ModelSource
        from kvlab.recipes.loading import load_model as load

        original = load(ModelSource(model=args.original, device=args.device, model_dtype=args.model_dtype),
                        "kvlab eval --original")
    kvlab_tasks, harness_tasks = _split_tasks(args.tasks)
    out = {"model": str(args.model), "data": args.data, "kv_quant": args.kv_quant,
           "kv_bytes_per_token_bf16": model.cfg.kv_bytes_per_token("bf16"),
           "kv_bytes_per_token": model.cfg.kv_bytes_per_token(model.dtype, args.kv_quant)}
    lines = []
    if args.data is None and not (args.passkey or args.tasks):
        args.data = out["data"] = "builtin"
    if args.data not in (None, "offdomain"):
        out.update(_score_text(args, model, original, lines))
    if args.data == "offdomain" or args.passkey or kvlab_tasks:
        out.update(_score_suite(args, model, original, kvlab_tasks, lines))
    if harness_tasks:
        out.update(_score_harness(args, model, original, harness_tasks, lines))
    print(json.dumps(out, indent=2) if args.json else "\n".join(lines))
    return 0


def _score_text(args, model, original, lines: list[str]) -> dict:
    """Perplexity on --data (with --original, the fidelity to it on the same tokens)."""
    from kvlab.data.corpus import corpus_fingerprint
    from kvlab.data.sources import read_documents
    from kvlab.eval.perplexity import evaluate

    docs = read_documents(args.data, tokenizer=model.tokenizer)
    if original is None:
        result = evaluate(model, model.tokenizer, docs, seq_len=args.seq_len, stride=args.stride,
                          max_tokens=args.max_tokens, batch_size=args.batch_size, progress=not args.no_progress,
                          backend=args.backend, kv_quant=args.kv_quant)
    else:                           # the same perplexity, and the fidelity, from one pass over the text
        from kvlab.eval.fidelity import compare

        result, fid = compare(original, model, model.tokenizer, docs, seq_len=args.seq_len, stride=args.stride,
                              max_tokens=args.max_tokens, batch_size=args.batch_size, kv_quant=args.kv_quant,
                              backend=args.backend, progress=not args.no_progress)
    out = {"data_fingerprint": corpus_fingerprint(docs), **result.to_dict()}
    lines.append(f"{args.model} on {args.data}: perplexity {result.perplexity:.3f}, {result.bits_per_byte:.4f} "
                 f"bits/byte, {result.tokens:,} tokens ({result.bytes:,} bytes, {result.documents} documents), "
                 f"windows of {result.seq_len} with stride {result.stride}")
    if original is not None:
        out["fidelity"] = fid.to_dict()
        lines.append(_fidelity_line(f"against {args.original}", out["fidelity"]))
    return out


def _fidelity_line(label: str, f: dict) -> str:
    return (f"{label}: perplexity ratio {f['perplexity_ratio']:.4f}, KL(original || model) {f['kl']:.4f} "
            f"nats/token, top-1 agreement {f['top1_agreement']:.1%}")


def _split_tasks(spec: str | None) -> tuple[list[str], list[str]]:
    """--tasks as (kvlab's built-in tasks, lm-eval's tasks)."""
    from kvlab.eval.suite import TASKS

    names = [t.strip() for t in (spec or "").split(",") if t.strip()]
    return [t for t in names if t in TASKS], [t for t in names if t not in TASKS]


def _score_suite(args, model, original, tasks: list[str], lines: list[str]) -> dict:
    """The off-domain sets, passkey retrieval and kvlab's tasks (kvlab.eval.suite), the original's beside."""
    from kvlab.data.offdomain import DEFAULT_TOKENS
    from kvlab.eval.passkey import DEPTHS, default_lengths
    from kvlab.eval.suite import build_suite

    offdomain = args.data == "offdomain"
    lengths = (args.passkey_lengths or default_lengths(model.cfg.max_seq_len)) if args.passkey else []
    too_long = [n for n in lengths if n > model.cfg.max_seq_len]
    if too_long:
        raise UsageError(f"kvlab eval: --passkey-lengths {too_long[0]} exceeds the model's context "
                         f"({model.cfg.max_seq_len:,} tokens)")
    suite = build_suite(model.tokenizer, model.cfg.max_seq_len,
                        domain_tokens=(args.max_tokens or DEFAULT_TOKENS) if offdomain else 0,
                        passkey_lengths=lengths, passkey_depths=DEPTHS, passkey_trials_per_cell=args.passkey_trials,
                        task_items=args.task_items if tasks else 0, tasks=tasks, seq_len=args.seq_len)
    if offdomain and not suite.domains:
        raise ConfigError("this machine ships none of the off-domain sets' files (/usr/include, /usr/share/man, "
                          "node_modules, /usr/share/common-licenses); evaluate on --data FILES instead")
    ours = suite.score(model, model.tokenizer, original=original, kv_quant=args.kv_quant, backend=args.backend)
    # the original's perplexity on each set comes with the model's fidelity to it
    theirs = (suite.score(original, model.tokenizer, backend=args.backend, domains=False)
              if original is not None else None)
    for name, d in ours.get("domains", {}).items():
        lines.append(_fidelity_line(f"{name} ({d['tokens']:,} tokens) against {args.original}", d) if original
                     else f"{name}: perplexity {d['perplexity']:.3f} over {d['tokens']:,} tokens")
    if "passkey" in ours:
        pk = ours["passkey"]
        lines.append("passkey retrieval: " + ", ".join(
            f"{int(n):,} tokens {v:.0%}" + (f" (original {theirs['passkey']['by_length'][n]:.0%})" if theirs else "")
            for n, v in pk["by_length"].items()) + f"; {pk['trials']} trials at depths "
            + ", ".join(f"{d:g}" for d in DEPTHS))
    for name, score in ours.get("tasks", {}).items():
        norm = f" (acc_norm {score['accuracy_norm']:.1%})" if score["accuracy_norm"] is not None else ""
        other = f"; original {theirs['tasks'][name]['accuracy']:.1%}" if theirs else ""
        lines.append(f"{name}: accuracy {score['accuracy']:.1%}{norm} over {score['n']} items{other}")
    out = {"suite": ours}
    if theirs is not None:
        out["original_suite"] = theirs
    return out


def _score_harness(args, model, original, tasks: list[str], lines: list[str]) -> dict:
    """lm-evaluation-harness tasks (kvlab.eval.harness), the original's beside."""
    from kvlab.eval.harness import run_tasks

    options = dict(include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                   batch_size=args.batch_size, backend=args.backend)
    ours = run_tasks(model, tasks, kv_quant=args.kv_quant, **options)
    theirs = run_tasks(original, tasks, **options) if original is not None else None
    for task, metrics in ours.items():
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                other = f" (original {theirs[task][key]:.4f})" if theirs and key in theirs.get(task, {}) else ""
                lines.append(f"lm-eval {task} {key.split(',')[0]}: {value:.4f}{other}")
    out = {"lm_eval": ours}
    if theirs is not None:
        out["original_lm_eval"] = theirs
    return out

"""``kvlab generate``: text from a model, streamed."""

from __future__ import annotations

import argparse
import json

from kvlab.cli.common import UsageError, kv_quant_arg, load_model, model_args, positive_int, seed_arg


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model",
                       description="Generate from a model: prefill, then decode with the KV cache.")
    model_args(p, adapter=True, window=True)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", metavar="IDS", help="a prompt as token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=seed_arg, help="makes sampling deterministic")
    p.add_argument("--stop-token", type=int, action="append", help="token id that ends a row (default EOS)")
    p.add_argument("--no-stop", action="store_true", help="generate exactly --max-new-tokens tokens (no EOS stop)")
    p.add_argument("--num-beams", type=positive_int, default=1,
                   help="an encoder–decoder: beam search with this many hypotheses per source (default 1: greedy "
                        "or sampling)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="--num-beams: hypotheses are scored by sum log p / length ** this (default 1.0)")
    p.add_argument("--backend", help="attention backend: reference, sdpa, flash, triton or auto (default: the model's)")
    kv_quant_arg(p)
    p.add_argument("--json", action="store_true", help="print prompts and outputs as JSON")
    p.set_defaults(func=run)


def _check_cache_fits(model, rows: int, length: int, new_tokens: int, kv_quant: str | None = None) -> None:
    """Refuse a generation whose KV cache alone would exceed this machine's memory (before trying)."""
    import os

    from kvlab.config.accounting import cache_bytes

    need = rows * cache_bytes(model.cfg, model.dtype, kv_quant).for_sequence(length)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise UsageError(f"kvlab generate: --max-new-tokens {new_tokens} needs a KV cache of {need / 2**30:,.1f} GiB "
                         f"for {rows} row(s), more than this machine's {have / 2**30:,.0f} GiB of memory; generate "
                         f"fewer tokens")


def run(args: argparse.Namespace) -> int:
    from kvlab.inference.generation import generate

    if args.prompt is None and args.prompt_ids is None:
        raise UsageError("kvlab generate: give --prompt TEXT or --prompt-ids 1,2,3")
    if args.prompt is not None and args.prompt_ids is not None:
        raise UsageError("kvlab generate: give --prompt TEXT or --prompt-ids 1,2,3, not both (one batch is "
                         "either text or token ids)")
    model = load_model(args)
    tok = model.tokenizer
    seq2seq = model.cfg.is_encoder_decoder
    if args.num_beams > 1 and not seq2seq:
        raise UsageError("kvlab generate: --num-beams is beam search for encoder–decoders; decoder-only models "
                         "generate greedily or by sampling")
    if seq2seq and (args.chat or args.kv_quant != "none" or getattr(args, "window", None) is not None):
        flag = "--chat" if args.chat else "--kv-quant" if args.kv_quant != "none" else "--window"
        raise UsageError(f"kvlab generate: {flag} is for decoder-only models; an encoder–decoder takes each --prompt "
                         f"as its source")
    if args.prompt is not None:
        if tok is None:
            raise UsageError(f"kvlab generate: {args.model} has no tokenizer; pass --prompt-ids instead")
        if seq2seq:
            from kvlab.data.seq2seq import encode_text

            prompts = [encode_text(tok, p) for p in args.prompt]
        elif args.chat:
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in args.prompt]
        else:
            prompts = [tok.encode(p) for p in args.prompt]
    else:
        try:
            prompts = [[int(t) for t in ids.split(",")] for ids in args.prompt_ids]
        except ValueError:
            raise UsageError(f"kvlab generate: --prompt-ids {args.prompt_ids} must be comma-separated "
                             f"integers such as 1,2,3") from None
    if args.no_stop and args.stop_token:
        raise UsageError("kvlab generate: --no-stop and --stop-token contradict each other; give one")
    stop = [] if args.no_stop else args.stop_token if args.stop_token else None
    for t in [*(stop or []), *(i for p in prompts for i in p)]:
        if not 0 <= t < model.cfg.vocab_size:
            raise UsageError(f"kvlab generate: token id {t} is outside the vocabulary [0, {model.cfg.vocab_size})")
    _check_cache_fits(model, len(prompts), max(map(len, prompts)) + args.max_new_tokens, args.max_new_tokens,
                      args.kv_quant)
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

    if seq2seq:
        from kvlab.inference.seq2seq import generate_seq2seq

        stream = stream and args.num_beams == 1       # beam search knows its best hypothesis only at the end
        outs = generate_seq2seq(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, num_beams=args.num_beams,
                                length_penalty=args.length_penalty, stop_tokens=stop, backend=args.backend,
                                on_token=on_token if stream else None)
    else:
        if stream and args.prompt is not None and not args.chat:
            print(args.prompt[0], end="", flush=True)
        outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop_tokens=stop, backend=args.backend,
                        on_token=on_token if stream else None, kv_quant=args.kv_quant)
    if stream:
        print()
    if args.json:
        print(json.dumps([{"prompt_ids": p, "new_ids": o,
                           "text": tok.decode(o, skip_special_tokens=True) if tok else None}
                          for p, o in zip(prompts, outs)], indent=2))
    elif not stream:
        for i, (p, o) in enumerate(zip(prompts, outs)):
            print(f"[{i}] " + (tok.decode(o, skip_special_tokens=True) if tok else " ".join(map(str, p + o))))
    return 0

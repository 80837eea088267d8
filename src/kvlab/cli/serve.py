"""``kvlab serve``: an OpenAI-compatible server with continuous batching over a KV budget in bytes."""

from __future__ import annotations

import argparse

from kvlab.cli.common import UsageError, kv_quant_arg, load_model, model_args, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API (continuous batching, paged KV)",
                       description="Serve MODEL over HTTP with the OpenAI API: /v1/completions, /v1/chat/completions "
                                   "(streaming with \"stream\": true), /v1/models, /health and /metrics. Requests "
                                   "join and leave the running batch at every step; their KV cache lives in blocks "
                                   "of a pool of --kv-budget bytes, so a smaller cache serves more requests at once.")
    model_args(p, adapter=True, window=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send (default: MODEL's name)")
    p.add_argument("--kv-budget", default="1GiB", metavar="SIZE",
                   help="memory for the KV cache of all running requests, e.g. 512MiB, 8GiB (default 1GiB)")
    p.add_argument("--max-len", type=positive_int, metavar="N",
                   help="the longest request, prompt + new tokens (default: the model's max_seq_len)")
    p.add_argument("--max-seqs", type=positive_int, default=64, help="most requests running at once (default 64)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="most requests waiting; beyond it requests get HTTP 429 (default 256)")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--admission", choices=["reserve", "optimistic"], default="reserve",
                   help="reserve: a request is admitted with KV blocks for its prompt and all its max_tokens, so it "
                        "never waits (default); optimistic: blocks for the prompt only, more as it grows, the newest "
                        "request preempted and recomputed when they run out (vLLM's policy)")
    p.add_argument("--prefill-chunk", type=positive_int, default=512,
                   help="most prompt tokens prefilled between two decode steps (default 512)")
    p.add_argument("--backend", help="attention backend: reference, sdpa, flash, triton or auto (default: the model's)")
    kv_quant_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.eval.plan import format_bytes, parse_size
    from kvlab.inference.engine import Engine
    from kvlab.serve.server import bind, make_server

    try:
        budget = parse_size(args.kv_budget)
    except ValueError as e:
        raise UsageError(f"kvlab serve: --kv-budget {args.kv_budget!r}: {e}") from None
    if not 0 <= args.port < 65536:
        raise UsageError(f"kvlab serve: --port {args.port} must be in [0, 65536)")
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise UsageError(f"kvlab serve: cannot listen on {args.host}:{args.port} ({e.strerror}); pick another "
                         f"--port or --host") from None
    try:
        model = load_model(args, decoder_only="serve")
        name = args.served_model_name or model.cfg.name or args.model
        engine = Engine(model, kv_budget_bytes=budget, max_len=args.max_len, max_seqs=args.max_seqs,
                        max_queue=args.max_queue, block_size=args.block_size, prefill_chunk=args.prefill_chunk,
                        admission=args.admission,
                        backend=args.backend, kv_quant=args.kv_quant)
        pool = engine.pool
        host, port = sock.getsockname()[:2]
        print(f"kvlab serve: {name} on http://{host}:{port}/v1 — KV pool {format_bytes(pool.nbytes)}: "
              f"{pool.num_blocks:,} blocks of {pool.block_size} tokens, {pool.max_sequences(engine.max_len):,} "
              f"sequence(s) of the full {engine.max_len:,} tokens at once (up to {pool.max_seqs} shorter ones)",
              flush=True)
        make_server(engine, model.tokenizer, name, log_level="info").run(sockets=[sock])
    finally:
        sock.close()
    return 0

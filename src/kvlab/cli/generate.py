"""``kvlab generate``: text from a model, streamed (:mod:`kvlab.recipes.generate`)."""

from __future__ import annotations

import argparse
import json
from functools import partial

from kvlab.cli.common import (
    config_from_args,
    config_option,
    kv_quant_arg,
    model_args,
    model_source,
    positive_int,
    seed_arg,
)
from kvlab.recipes.generate import GenerateConfig


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model",
                       description="Generate from a model: prefill, then decode with the KV cache.")
    model_args(p, adapter=True, window=True)
    option = partial(config_option, p, GenerateConfig)
    option("prompt", action="append", metavar="TEXT")
    option("prompt_ids", action="append", metavar="IDS")
    option("chat", action="store_true")
    option("max_new_tokens", type=positive_int)
    option("temperature", type=float)
    option("top_k", type=int)
    option("top_p", type=float)
    option("seed", type=seed_arg)
    option("stop_token", type=int, action="append")
    option("no_stop", action="store_true")
    option("num_beams", type=positive_int)
    option("length_penalty", type=float)
    option("backend")
    kv_quant_arg(p)
    p.add_argument("--json", action="store_true", help="print prompts and outputs as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.recipes.generate import generate_text

    cfg = config_from_args(GenerateConfig, args, source=model_source(args))
    result = generate_text(cfg, write=None if args.json else lambda text: print(text, end="", flush=True))
    if args.json:
        print(json.dumps(result.records(), indent=2))
    elif not result.streamed:
        for line in result.lines():
            print(line)
    return 0

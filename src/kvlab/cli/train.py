"""``kvlab train``: pretrain from a config or uptrain a checkpoint (:mod:`kvlab.recipes.pretrain`)."""

from __future__ import annotations

import argparse
import json
import os
from functools import partial

from kvlab.cli.common import add_overwrite, config_from_args, config_option, device_arg, seed_arg
from kvlab.recipes.pretrain_config import PRETRAIN_MODES, PretrainConfig
from kvlab.training.distributed import STRATEGIES


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain from a config, or uptrain a checkpoint",
                       description="Train with AdamW, warm-up + cosine decay, gradient clipping and exact resume "
                                   "from atomic checkpoints. Pretrain a --preset/--config (byte tokenizer) or "
                                   "uptrain --init MODEL, e.g. the output of kvlab convert.")
    src = p.add_argument_group("model (give one)")
    option = partial(config_option, p, PretrainConfig)
    config_option(src, PretrainConfig, "preset", metavar="NAME")
    config_option(src, PretrainConfig, "config", metavar="FILE")
    config_option(src, PretrainConfig, "init", metavar="MODEL")
    option("n_kv_head", type=int)
    option("cla", type=int)
    option("cross_n_kv_head", type=int, metavar="N")
    option("cross_cla", type=int, metavar="K")
    option("out", required=True, metavar="DIR")
    for name in ("data", "data_field", "source_field", "target_field"):
        option(name)
    budget = p.add_argument_group("budget (give one)")
    config_option(budget, PretrainConfig, "max_steps", type=int)
    config_option(budget, PretrainConfig, "tokens", type=int)
    config_option(budget, PretrainConfig, "alpha", type=float)
    config_option(budget, PretrainConfig, "reference_tokens", type=int)
    for name in ("batch_size", "grad_accum", "seq_len"):
        option(name, type=int)
    option("lr", type=float)
    for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last", "log_every"):
        option(name, type=int)
    option("seed", type=seed_arg)
    option("train_only", choices=PRETRAIN_MODES)
    option("data_mode", choices=["random", "sequential"])
    option("cache_dir")
    option("resume", action="store_true")
    add_overwrite(p, run=True)
    option("strategy", choices=STRATEGIES)
    option("device", type=device_arg)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.recipes.pretrain import pretrain

    summary = pretrain(config_from_args(PretrainConfig, args))
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        print(json.dumps({"final": summary["final"], **{k: v for k, v in summary.items()
                                                        if k not in ("start_step", "final")}}))
    return 0

"""``kvlab finetune``: an adapter on chat data (:mod:`kvlab.recipes.finetune`)."""

from __future__ import annotations

import argparse
import json
from functools import partial

from kvlab.cli.common import (
    add_overwrite,
    config_from_args,
    config_option,
    model_args,
    model_source,
    positive_int,
    seed_arg,
)
from kvlab.peft import METHODS
from kvlab.recipes.finetune_config import LOSS_TYPES_OF, OBJECTIVES, FinetuneConfig


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune an adapter (LoRA, QLoRA, AdaLoRA, prefix, P-tuning v2, prompt) "
                                        "on chat data (SFT) or preference pairs (reward model, DPO)",
                       description="Supervised fine-tuning on chat JSONL ({\"messages\": [...]} per line) with the "
                                   "model's chat template and the loss on assistant tokens only. Writes OUT/adapter "
                                   "(kvlab), OUT/peft (HF PEFT, LoRA family), OUT/merged (--merge) and "
                                   "OUT/summary.json; checkpoints for --resume.")
    model_args(p)
    option = partial(config_option, p, FinetuneConfig)
    option("method", required=True, choices=METHODS)
    option("objective", choices=OBJECTIVES)
    option("data", required=True, metavar="FILE")
    option("eval_data", metavar="FILE")
    option("eval_limit", type=int)
    option("out", required=True, metavar="DIR")
    budget = p.add_argument_group("budget (give one)")
    config_option(budget, FinetuneConfig, "max_steps", type=int)
    config_option(budget, FinetuneConfig, "epochs", type=float)
    option("batch_size", type=int)
    option("grad_accum", type=int)
    option("seq_len", type=int)
    option("pack", action="store_true")
    option("lr", type=float)
    for name in ("warmup_steps", "save_every", "keep_last", "log_every"):
        option(name, type=int)
    option("seed", type=seed_arg)
    option("resume", action="store_true")
    add_overwrite(p, run=True)
    option("merge", action="store_true")
    group = partial(config_option, p.add_argument_group("LoRA / QLoRA / AdaLoRA"), FinetuneConfig)
    group("r", type=int)
    group("init_r", type=int)
    group("alpha", type=float)
    group("dropout", type=float)
    group("rslora", action="store_true")
    group("target_modules")
    group = partial(config_option, p.add_argument_group("reward / dpo / grpo"), FinetuneConfig)
    group("beta", type=float)
    group("loss_type", choices=[t for types in LOSS_TYPES_OF.values() for t in types])
    group("num_generations", type=positive_int)
    group("max_new_tokens", type=positive_int)
    group("temperature", type=float)
    group("epsilon", type=float)
    group("num_iterations", type=positive_int)
    group("mini_batches", type=positive_int)
    group("kl_coef", type=float)
    group("vf_coef", type=float)
    group("reward_model", metavar="MODEL")
    group("simpo_gamma", type=float)
    group("sft_weight", type=float)
    group("center_rewards", type=float)
    group = partial(config_option, p.add_argument_group("prefix / P-tuning v2 / prompt tuning"), FinetuneConfig)
    group("virtual_tokens", type=positive_int)
    group("reparam_hidden", type=int)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.recipes.finetune import run_finetune

    summary = run_finetune(config_from_args(FinetuneConfig, args, source=model_source(args)))
    print(json.dumps(brief(summary)))
    return 0


def brief(summary: dict) -> dict:
    """What the verb prints: the summary's headline numbers, its accuracies as fractions."""
    keys = ("method", "trainable_parameters", "first_loss", "final_loss", "first_reward", "final_reward",
            "seconds_per_step", "peak_memory_bytes", "base_weight_memory", "adapter", "peft", "merged")
    out = {k: summary[k] for k in keys if k in summary}
    out["objective"] = summary["objective"]
    for k in ("accuracy_before", "accuracy_after", "pairwise_accuracy_before", "pairwise_accuracy_after"):
        if k in summary:
            out[k] = summary[k]["accuracy"]
    return out

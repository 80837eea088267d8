"""``kvlab finetune``: attach an adapter, train it on chat data (SFT), preference pairs (a reward
model, DPO / IPO / SimPO) or online rollouts (GRPO, PPO), write it (and what it is worth).

:func:`run_finetune` is the whole verb for Python callers (a :class:`FinetuneConfig` in, the
summary out): it checks the settings, reads the data, loads the model, builds the objective and
its batches, and runs :func:`finetune` in a resumable run directory.

The run directory gets the training loop's ``metrics.jsonl`` and adapter-only ``checkpoints/``
(``--resume`` continues exactly), then ``adapter/`` (the kvlab adapter; prefix tuning's MLP
merged away), ``peft/`` for LoRA-family methods on HF-exportable models (HF PEFT's format),
``merged/`` with ``merge=True`` (LoRA/AdaLoRA folded into a full checkpoint), and
``summary.json``: trainable parameters (counted and closed form), base weight memory, peak memory,
step time and, given held-out conversations, exact-match accuracy before and after.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from kvlab.errors import ConfigError
from kvlab.io import save_checkpoint
from kvlab.peft import (
    LORA_FAMILY,
    AdapterSpec,
    adapter_parameters,
    attach,
    export_peft,
    merge_and_unload,
    merge_prompt_reparameterization,
    parameter_count,
    save_adapter,
)
from kvlab.peft.adapter import MERGEABLE
from kvlab.peft.prefix import PREFIX_METHODS
from kvlab.recipes.finetune_config import FinetuneConfig
from kvlab.recipes.finetune_objectives import read_finetune_data, training_setup
from kvlab.training import TrainConfig, train

# What a fine-tuning run writes into its directory (--overwrite deletes these and nothing else).
FINETUNE_OUTPUTS = ("metrics.jsonl", "checkpoints", "adapter", "peft", "merged", "summary.json")


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune ``cfg.source``'s model as ``cfg`` says, in the run directory ``cfg.out``
    (resumable); returns :func:`finetune`'s summary."""
    from kvlab.io.atomic import refuse_output_over_input
    from kvlab.io.rundir import RunDirectory
    from kvlab.recipes.loading import load_model
    from kvlab.training.checkpoints import RESUMABLE_CHANGES

    refuse_output_over_input(cfg.out, [cfg.source.model, cfg.reward_model])
    refuse_output_over_input(cfg.out, [cfg.data, cfg.eval_data], what="its data", holds=False)
    spec = cfg.adapter_spec()
    cfg.check()
    data = read_finetune_data(cfg)
    cfg.check_budget()
    model = load_model(cfg.source, decoder_only="finetune")
    if cfg.method not in LORA_FAMILY and cfg.virtual_tokens >= model.cfg.max_seq_len:
        raise ConfigError(f"kvlab finetune: --virtual-tokens {cfg.virtual_tokens} leaves no room for text in the "
                          f"model's context of {model.cfg.max_seq_len} tokens; use far fewer (e.g. 16-64)")
    if model.tokenizer is None:
        raise ConfigError(f"kvlab finetune: {cfg.source.model} has no tokenizer to render the chat data with")
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"kvlab finetune: --seq-len {cfg.seq_len} exceeds the model's max_seq_len "
                          f"{model.cfg.max_seq_len}; use rows of at most {model.cfg.max_seq_len} tokens")
    setup = training_setup(cfg, model, data)
    tcfg = cfg.train_config(len(setup.batches.rows))
    torch.manual_seed(cfg.seed)
    with RunDirectory(cfg.out, "finetune", cfg.settings(spec, tcfg), entries=FINETUNE_OUTPUTS, resume=cfg.resume,
                      overwrite=cfg.overwrite, free=RESUMABLE_CHANGES, scaffolding=("metrics.jsonl", "checkpoints")):
        return finetune(model, model.tokenizer, spec, setup.batches, tcfg, eval_conversations=data.eval_conversations,
                        merge=cfg.merge, resume=cfg.resume, device=cfg.source.device, objective=setup.objective,
                        eval_pairs=setup.eval_pairs)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024     # Linux reports KiB


def finetune(model, tokenizer, spec: AdapterSpec, batches, cfg: TrainConfig, *,
             eval_conversations: Sequence | None = None, merge: bool = False,
             resume: bool = False, device: str | torch.device = "cpu", compute_dtype: torch.dtype | None = None,
             eval_max_new_tokens: int = 16, quiet: bool = False, objective=None, eval_pairs=None) -> dict:
    """Train ``spec``'s adapter on ``batches`` (chat rows for SFT; preference pairs with a
    :class:`~kvlab.training.preference.RewardLoss` or :class:`~kvlab.training.preference.DPOLoss`
    ``objective``). ``eval_conversations``: task accuracy before and after; ``eval_pairs``
    (:class:`~kvlab.data.preferences.PreferenceBatches`, reward models): pairwise accuracy."""
    from kvlab.eval.tasks import task_accuracy
    from kvlab.training.preference import pairwise_accuracy

    if cfg.train_only != "adapter":
        raise ConfigError("finetune trains adapters: TrainConfig(train_only='adapter')")
    if getattr(batches, "pack", False) and spec.method in PREFIX_METHODS:
        raise ConfigError(f"--pack puts several conversations in one row, but a {spec.method} adapter is one prefix "
                          f"per row; fine-tune {spec.method} without --pack")
    if merge and spec.method not in MERGEABLE:
        raise ConfigError(f"--merge folds LoRA/AdaLoRA into the base weights; {spec.method} has nothing to merge"
                          + (" into a 4-bit base (save the adapter, or use --method lora)"
                             if spec.method == "qlora" else ""))
    device = torch.device(device)
    out = Path(cfg.out_dir)
    if spec.method == "adalora" and "total_steps" not in spec.options:
        spec = AdapterSpec("adalora", {**spec.options, "total_steps": cfg.max_steps})
    model.to(device)
    summary: dict = {"method": spec.method, "options": spec.config.to_dict(), "train_config": asdict(cfg),
                     "data": batches.stats, "objective": getattr(objective, "name", "lm")}
    if eval_conversations and not resume:
        summary["accuracy_before"] = task_accuracy(model, tokenizer, eval_conversations,
                                                   max_new_tokens=eval_max_new_tokens)
        _say(quiet, f"accuracy before: {summary['accuracy_before']['accuracy']:.1%}")
    if eval_pairs is not None and not resume:
        summary["pairwise_accuracy_before"] = pairwise_accuracy(model, eval_pairs.all_batches())
        _say(quiet, f"pairwise accuracy before: {summary['pairwise_accuracy_before']['accuracy']:.1%}")
    attached = attach(model, spec, compute_dtype=compute_dtype)
    trainable = adapter_parameters(model)
    summary["trainable_parameters"] = sum(p.numel() for _, p in trainable)
    summary["trainable_parameters_closed_form"] = parameter_count(model.cfg, spec)
    summary["total_parameters"] = sum(p.numel() for p in model.parameters())
    if attached.memory:
        summary["base_weight_memory"] = attached.memory
    _say(quiet, f"{spec.method}: {summary['trainable_parameters']:,} trainable parameters of "
                f"{summary['total_parameters']:,}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = train(model, batches, None, cfg, resume=resume, device=device, quiet=quiet, hooks=attached.allocator,
                   objective=objective)
    elapsed = time.perf_counter() - t0
    steps_run = cfg.max_steps - result["start_step"]
    summary.update(final_loss=result.get("loss"), steps=cfg.max_steps, seconds_per_step=elapsed / max(1, steps_run),
                   peak_memory_bytes=peak_memory_bytes(device))
    first = _first_record(out)
    if first is not None:
        summary["first_loss"] = first["loss"]
    if "reward" in result:                     # GRPO: the mean reward of the first and last steps' rollouts
        summary.update(first_reward=first.get("reward"), final_reward=result["reward"],
                       rollout_tokens_per_s=result.get("rollout_tokens_per_s"))
    if attached.allocator is not None:
        summary["adalora_ranks"] = attached.allocator.ranks()
    merge_prompt_reparameterization(model)
    save_adapter(model, out / "adapter")
    summary["adapter"] = str(out / "adapter")
    if spec.method in LORA_FAMILY:
        summary["peft"] = _try_export_peft(model, out / "peft")
    if eval_pairs is not None:
        summary["pairwise_accuracy_after"] = pairwise_accuracy(model, eval_pairs.all_batches())
        _say(quiet, f"pairwise accuracy after: {summary['pairwise_accuracy_after']['accuracy']:.1%}")
    if eval_conversations:
        summary["accuracy_after"] = task_accuracy(model, tokenizer, eval_conversations,
                                                  max_new_tokens=eval_max_new_tokens)
        _say(quiet, f"accuracy after: {summary['accuracy_after']['accuracy']:.1%}")
    if merge:
        merged = merge_and_unload(model)
        merged.tokenizer = tokenizer
        save_checkpoint(merged, out / "merged")
        summary["merged"] = str(out / "merged")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _try_export_peft(model, directory: Path) -> str:
    from kvlab.io.hf import config_to_hf

    try:
        config_to_hf(model.cfg, torch.float32)
    except ConfigError as e:
        return f"not written: the base model has no HF equivalent ({e})"
    export_peft(model, directory, base_model_name_or_path=getattr(model.cfg, "name", None))
    return str(directory)


def _first_record(out: Path) -> dict | None:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line:
            return json.loads(line)
    return None


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)

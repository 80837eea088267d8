"""``kvlab train`` for an encoder–decoder: source → target pairs (the built-in instruction tasks, or
a JSONL file) with the target cross-entropy (:class:`~kvlab.training.objectives.Seq2SeqCrossEntropy`),
through the same loop as every other objective (exact resume, checkpoints, metrics), then
``OUT/final`` and, on held-out pairs, the target loss and exact-match accuracy.

Validation pairs are never trained on: the built-in tasks' held-out split has its own seed (the
``test.jsonl`` of ``kvlab tasks``), and a JSONL file gives every 20th pair to validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvlab.data.seq2seq import Pair, Seq2SeqBatches, SequentialBatches, read_pairs, task_pairs
from kvlab.errors import ConfigError
from kvlab.io.kvlab_format import save_checkpoint
from kvlab.io.provenance import record_step
from kvlab.training import TrainConfig, train
from kvlab.training.objectives import Seq2SeqCrossEntropy

BUILTIN = ("builtin", "tasks")
TASK_TEST_SEED = 1_000_003          # kvlab.data.instruct.write_task_files's held-out split
HOLDOUT_EVERY = 20


def seq2seq_pairs(data: str = "builtin", *, source_field: str = "source", target_field: str = "target",
                  n_tasks: int = 4000, n_validation: int = 200) -> tuple[list[Pair], list[Pair]]:
    """Train and validation pairs of ``data``: ``builtin``/``tasks`` (``n_tasks`` instruction tasks,
    ``n_validation`` held out with their own seed) or a JSONL file (every 20th pair held out)."""
    if data in BUILTIN:
        return task_pairs(n_tasks, seed=0), task_pairs(n_validation, seed=TASK_TEST_SEED)
    pairs = pairs_file(data, source_field, target_field)
    if len(pairs) < HOLDOUT_EVERY:
        return pairs, []
    return ([p for i, p in enumerate(pairs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1],
            [p for i, p in enumerate(pairs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1])


def pairs_file(data: str, source_field: str = "source", target_field: str = "target") -> list[Pair]:
    """Every pair of a JSONL file (one clear error for anything else)."""
    if Path(data).suffix != ".jsonl":
        raise ConfigError(f"--data {data!r}: an encoder–decoder reads source/target pairs; give 'builtin' "
                          f"(the instruction tasks) or a .jsonl file of {{\"{source_field}\": ..., "
                          f"\"{target_field}\": ...}} lines")
    return read_pairs(data, source_field, target_field)


def evaluation_pairs(data: str) -> list[Pair]:
    """What ``kvlab eval`` scores an encoder–decoder on: the built-in tasks' held-out split, or every
    pair of a JSONL file."""
    return seq2seq_pairs(data, n_tasks=1)[1] if data in BUILTIN else pairs_file(data)


def run_seq2seq_training(model, cfg: TrainConfig, *, data: str = "builtin", source_field: str = "source",
                         target_field: str = "target", n_tasks: int = 4000, device: str | torch.device = "cpu",
                         resume: bool = False, record: dict[str, Any] | None = None, evaluate: bool = True,
                         quiet: bool = False) -> dict:
    """Train ``model`` (an encoder–decoder) on ``data``'s pairs, sources and targets cut at
    ``cfg.seq_len`` tokens; write ``OUT/final``; return the loop's summary plus ``final`` and, with
    ``evaluate``, the held-out ``validation`` loss and accuracy."""
    from kvlab.eval.seq2seq import exact_match, target_loss

    if not model.cfg.is_encoder_decoder:
        raise ConfigError("run_seq2seq_training trains an encoder–decoder")
    if model.tokenizer is None:
        raise ConfigError("the model has no tokenizer to read the pairs with")
    train_pairs, val_pairs = seq2seq_pairs(data, source_field=source_field, target_field=target_field,
                                           n_tasks=n_tasks)
    start = model.cfg.decoder_start_token_id
    batches = Seq2SeqBatches(train_pairs, model.tokenizer, start, cfg.batch_size, max_source=cfg.seq_len,
                             max_target=cfg.seq_len, seed=cfg.seed)
    val = None
    if val_pairs:
        val = SequentialBatches(Seq2SeqBatches(val_pairs, model.tokenizer, start, cfg.batch_size,
                                               max_source=cfg.seq_len, max_target=cfg.seq_len).all_batches())
    summary = train(model, batches, val, cfg, resume=resume, device=torch.device(device),
                    objective=Seq2SeqCrossEntropy(), quiet=quiet)
    record_step(model, "train", objective="seq2seq", steps=cfg.max_steps, pairs=len(train_pairs), data=data,
                train_only=cfg.train_only, lr=cfg.lr, seed=cfg.seed, **(record or {}))
    final = Path(cfg.out_dir) / "final"
    save_checkpoint(model, final)
    out = {**summary, "final": str(final), "data": batches.stats}
    if evaluate and val_pairs:
        out["validation"] = {**target_loss(model, val_pairs, model.tokenizer),
                             **{k: v for k, v in exact_match(model, val_pairs, model.tokenizer).items()
                                if k in ("accuracy", "n", "per_task", "seconds_per_sample")}}
    return out

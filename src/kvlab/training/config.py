"""The training loop's settings (:class:`TrainConfig`): what every recipe hands to
:func:`kvlab.training.train`, and what a checkpoint records so that a resumed run can be checked
against the one that wrote it (:mod:`kvlab.training.checkpoints`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvlab.errors import ConfigError, require_positive_ints
from kvlab.training.groups import TRAIN_ONLY


@dataclass
class TrainConfig:
    """One training run. The defaults are ``kvlab train``'s (pretraining or uptraining a small model
    on CPU); fine-tuning sets its own (:class:`kvlab.recipes.finetune.FinetuneConfig`)."""

    out_dir: str
    max_steps: int
    batch_size: int = 8            # sequences per optimizer step (all accumulation micro-steps)
    grad_accum: int = 1
    seq_len: int = 256
    # A peak rate for models of a few million parameters trained from scratch; larger models and
    # fine-tuning use less (finetune: 2e-4).
    lr: float = 1e-3
    min_lr_ratio: float = 0.1      # cosine decay to 10 % of the peak, not to zero: the last steps still learn
    warmup_steps: int = 20
    weight_decay: float = 0.1      # on matrices only (kvlab.training.loop.make_optimizer)
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 50
    keep_last: int = 2             # two checkpoints: the newest may be the one a crash damaged
    log_every: int = 10
    seed: int = 0
    train_only: str = "all"        # a mode of kvlab.training.groups.TRAIN_MODES
    data_mode: str = "random"      # random windows, or the corpus in order (kvlab.data.windows.Windows)

    def __post_init__(self) -> None:
        require_positive_ints(self, ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every",
                                     "save_every", "keep_last", "log_every", "eval_batches"))
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if self.train_only not in TRAIN_ONLY:
            raise ConfigError(f"train_only={self.train_only!r} is not one of {list(TRAIN_ONLY)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr} must be a positive finite number")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r} must be a non-negative integer")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"seed={self.seed!r} must be an integer in [0, 2**32)")
        for name in ("weight_decay", "grad_clip", "min_lr_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value!r} must be a non-negative finite number")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

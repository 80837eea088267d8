"""Training: one loop (devices, torchrun, accumulation, schedule, checkpoints, exact resume,
metrics), the objectives it minimizes, and what trains (modes as unions of parameter groups).
Verbs are recipes over it (:mod:`kvlab.recipes`)."""

from kvlab.training.checkpoints import STATE_FILE, checkpoint_dirs, save_training_checkpoint
from kvlab.training.config import TrainConfig
from kvlab.training.distributed import STRATEGIES, Dist, full_model_state, wrap_model
from kvlab.training.groups import TRAIN_MODES, TRAIN_ONLY, parameter_groups, trainable_parameters
from kvlab.training.loop import TrainingError, evaluate_loss, lr_at, make_optimizer, steps_for_budget, train
from kvlab.training.objectives import IGNORE_INDEX, AttentionTransfer, CrossEntropy, Distillation, Objective

__all__ = ["IGNORE_INDEX", "STATE_FILE", "STRATEGIES", "TRAIN_MODES", "TRAIN_ONLY", "AttentionTransfer", "CrossEntropy",
           "Dist", "Distillation", "Objective", "TrainConfig", "TrainingError", "checkpoint_dirs", "evaluate_loss",
           "full_model_state", "lr_at", "make_optimizer", "parameter_groups", "save_training_checkpoint",
           "steps_for_budget", "train", "trainable_parameters", "wrap_model"]

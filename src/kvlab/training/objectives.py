"""Training objectives: what the loop minimizes, separated from how it loops.

An objective turns a micro-batch (a tuple of tensors whose first dimension is rows) into a loss
*summed* over the units it counts, and says how many units a whole step's batch counts, so that
the loop can divide every micro-batch's sum by the step's count: gradient accumulation and
several processes then weigh every unit alike. An objective may bring frozen models of its own
(a teacher for distillation, a reference for DPO) through :meth:`Objective.frozen_models`, which
the loop moves to the training device and keeps in eval mode; it receives the trained model on
every call, so it can also generate with it (GRPO, PPO).

Objectives that exist: :class:`CrossEntropy` (language modelling and SFT). See
``docs/ARCHITECTURE.md``, "How to add a training objective".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.data.chat import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "CrossEntropy", "Objective"]


class Objective:
    """Base class. Subclasses implement :meth:`loss` and :meth:`count`."""

    name = "objective"

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss of ``batch`` summed over its counted units (a 0-d tensor with a graph)."""
        raise NotImplementedError

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        """Units ``batch`` counts (tokens, sequences, pairs...)."""
        raise NotImplementedError

    def frozen_models(self) -> list[nn.Module]:
        """Models the objective uses but does not train (moved to the device, eval mode, no grad)."""
        return []

    def prepare(self, device: torch.device) -> None:
        for m in self.frozen_models():
            m.to(device).eval().requires_grad_(False)


class CrossEntropy(Objective):
    """Next-token cross-entropy on ``(tokens, targets[, segment_ids])`` batches; targets of
    ``IGNORE_INDEX`` (SFT prompts, padding) carry no loss; counts the other targets."""

    name = "lm"

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, *seg = batch
        logits = model(x) if not seg else model(x, segment_ids=seg[0])
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

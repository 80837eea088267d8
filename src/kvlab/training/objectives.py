"""Training objectives: what the loop minimizes, separated from how it loops.

An objective turns a micro-batch (a tuple of tensors whose first dimension is rows) into a loss
*summed* over the units it counts, and says how many units a whole step's batch counts, so that
the loop can divide every micro-batch's sum by the step's count: gradient accumulation and
several processes then weigh every unit alike. An objective may bring frozen models of its own
(a teacher for distillation, a reference for DPO) through :meth:`Objective.frozen_models`, which
the loop moves to the training device and keeps in eval mode; it receives the trained model on
every call, so it can also generate with it (GRPO, PPO).

Objectives that exist: :class:`CrossEntropy` (language modelling and SFT), :class:`Seq2SeqCrossEntropy`
(an encoder–decoder's targets given their sources), :class:`Distillation`
(KL to a frozen teacher's logits, temperature, top-k, mixed with the LM loss) and
:class:`AttentionTransfer` (each layer's attention output fitted to the teacher's, layer-wise). See
``docs/ARCHITECTURE.md``, "How to add a training objective".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.data.chat import IGNORE_INDEX
from kvlab.errors import ConfigError
from kvlab.eval.seq2seq import target_nll

__all__ = ["IGNORE_INDEX", "AttentionTransfer", "CrossEntropy", "Distillation", "Objective", "Seq2SeqCrossEntropy"]


class Objective:
    """Base class. Subclasses implement :meth:`loss` and :meth:`count`."""

    name = "objective"

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss of ``batch`` summed over its counted units (a 0-d tensor with a graph)."""
        raise NotImplementedError

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        """Units ``batch`` counts (tokens, sequences, pairs...)."""
        raise NotImplementedError

    #: Optimizer updates the loop makes on one step's batch (more than one: online RL reusing its
    #: rollouts, see :mod:`kvlab.training.rl`).
    updates_per_batch = 1

    def batch_for_update(self, model: nn.Module, batch: tuple[torch.Tensor, ...], update: int) -> tuple:
        """What update ``update`` (of ``updates_per_batch``) of a step trains on, from the step's
        ``batch``; the loop splits it into micro-batches. Default: the batch itself."""
        return batch

    def update_rows(self, rows: int) -> int:
        """Rows of an update's batch when a step's batch has ``rows`` (per process)."""
        return rows

    def frozen_models(self) -> list[nn.Module]:
        """Models the objective uses but does not train (moved to the device, eval mode, no grad)."""
        return []

    def pop_metrics(self) -> dict[str, float]:
        """What the objective measured since the last call (e.g. GRPO's mean reward and rollout
        speed); the loop adds it to the step's metrics record."""
        return {}

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


class Seq2SeqCrossEntropy(Objective):
    """An encoder–decoder's target cross-entropy on ``(src, src_mask, tgt_in, labels)`` batches
    (:class:`kvlab.data.seq2seq.Seq2SeqBatches`, teacher forcing); counts the labels that are not
    ``IGNORE_INDEX``."""

    name = "seq2seq"

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return target_nll(model, batch)[0]

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[3] != IGNORE_INDEX).sum())


class Distillation(Objective):
    """Knowledge distillation to a frozen ``teacher``'s next-token distribution, optionally mixed
    with the language-model loss, on ``(tokens, targets[, segment_ids])`` batches.

    Per counted position (targets not ``IGNORE_INDEX``), with student logits ``s`` and teacher
    logits ``t``: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton et al.'s ``T²`` keeps gradient
    scales comparable across temperatures). ``top_k``: the teacher's distribution is cut to its
    ``k`` most likely tokens and renormalized, and the KL is summed over those tokens against the
    student's full-vocabulary log-probabilities — the teacher side then needs only ``k`` logits per
    position. ``lm_weight`` ``w``: the loss is ``(1 − w)·KD + w·CE``.
    """

    name = "kd"

    def __init__(self, teacher: nn.Module, *, temperature: float = 1.0, top_k: int | None = None,
                 lm_weight: float = 0.0):
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature!r} must be positive")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ConfigError(f"top_k={top_k!r} must be a positive integer or None")
        if not 0 <= lm_weight <= 1:
            raise ConfigError(f"lm_weight={lm_weight!r} must be in [0, 1]")
        self.teacher, self.temperature, self.top_k, self.lm_weight = teacher, temperature, top_k, lm_weight

    def frozen_models(self) -> list[nn.Module]:
        return [self.teacher]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, *seg = batch
        kwargs = {} if not seg else {"segment_ids": seg[0]}
        student = model(x, **kwargs).float()
        with torch.no_grad():
            teacher = self.teacher(x, **kwargs).float()
        keep = (y != IGNORE_INDEX).flatten()
        s, t = student.flatten(0, 1)[keep], teacher.flatten(0, 1)[keep]
        T = self.temperature
        log_q = F.log_softmax(s / T, -1)
        if self.top_k is None:
            log_p = F.log_softmax(t / T, -1)
            kd = (log_p.exp() * (log_p - log_q)).sum()
        else:
            top, idx = (t / T).topk(min(self.top_k, t.shape[-1]), -1)
            log_p = F.log_softmax(top, -1)                      # the teacher, renormalized over its top k
            kd = (log_p.exp() * (log_p - log_q.gather(-1, idx))).sum()
        loss = (1 - self.lm_weight) * T * T * kd
        if self.lm_weight:
            loss = loss + self.lm_weight * F.cross_entropy(student.flatten(0, 1), y.flatten(),
                                                           ignore_index=IGNORE_INDEX, reduction="sum")
        return loss

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())


class AttentionTransfer(Objective):
    """Layer-wise attention transfer (LoLCATs' first stage): every layer's attention output of the
    trained model, computed on the *teacher's* attention inputs, is fitted to the teacher's
    attention output — all layers at once, with no LM head and no MLP in the backward.

    ``loss`` is the squared error summed over layers, positions and features, divided by
    ``d_model`` (a per-feature mean); :meth:`count` counts tokens. :meth:`layer_errors` reports each
    layer's relative error ``‖student − teacher‖ / ‖teacher‖`` (what the tests and reports read).
    Batches are ``(tokens, ...)``; only the tokens are read. Train with ``train_only="attention"``
    (or ``"kv"``): nothing else receives a gradient anyway.
    """

    name = "transfer"

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher

    def frozen_models(self) -> list[nn.Module]:
        return [self.teacher]

    @torch.no_grad()
    def teacher_attention(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The teacher's per-layer attention inputs and outputs at ``tokens``."""
        inputs, outputs, hooks = {}, {}, []
        for i, block in enumerate(self.teacher.layers):
            hooks.append(block.self_attn.register_forward_pre_hook(
                lambda m, args, i=i: inputs.__setitem__(i, args[0])))
            hooks.append(block.self_attn.register_forward_hook(
                lambda m, args, out, i=i: outputs.__setitem__(i, out)))
        try:
            self.teacher.hidden_states(tokens)
        finally:
            for h in hooks:
                h.remove()
        n = len(self.teacher.layers)
        return [inputs[i] for i in range(n)], [outputs[i] for i in range(n)]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        tokens = batch[0]
        inputs, targets = self.teacher_attention(tokens)
        student = getattr(model, "module", model)          # the model itself under DDP
        outs = student.attention_on(tokens, [h.to(student.dtype) for h in inputs])
        return sum(((o.float() - t.float()) ** 2).sum() for o, t in zip(outs, targets)) / targets[0].shape[-1]

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].numel()

    @torch.no_grad()
    def layer_errors(self, model: nn.Module, tokens: torch.Tensor) -> list[float]:
        inputs, targets = self.teacher_attention(tokens)
        outs = model.attention_on(tokens, [h.to(model.dtype) for h in inputs])
        return [float((o.float() - t.float()).norm() / t.float().norm().clamp_min(1e-12))
                for o, t in zip(outs, targets)]

"""Preference objectives: a reward model (Bradley–Terry) and direct preference optimisation (DPO,
IPO, SimPO), on the batches of :mod:`kvlab.data.preferences` — ``(tokens (B, 2, T), attention_mask,
completion_mask, pair_ids)``, each pair's chosen row then its rejected one. Each counts pairs, so a
step's loss is the mean over its pairs, as TRL's is.

**Reward model** (:class:`RewardLoss`): the score head of :meth:`Transformer.sequence_scores` at
each row's last real token (not padding, and not the pad token: transformers' and TRL's rule,
:func:`kvlab.models.heads.last_real_token`), ``−log σ(r⁺ − r⁻)``, plus ``c · (r⁺ + r⁻)²`` with reward centring
(TRL's ``center_rewards_coefficient``: keeps rewards near zero mean).

**DPO** (:class:`DPOLoss`): with ``π`` the policy's and ``ρ`` the reference's summed log-probability
of a completion, ``h = (π⁺ − ρ⁺) − (π⁻ − ρ⁻)`` and

- ``sigmoid`` (Rafailov et al.): ``−log σ(β h)``;
- ``ipo`` (Azar et al.): ``(h̄ − 1/(2β))²`` with log-ratios averaged over each completion's tokens
  (TRL's normalisation, which IPO's authors confirmed);
- ``simpo`` (Meng et al.; no reference): ``−log σ(β (π̄⁺ − π̄⁻) − γ)`` with length-averaged
  log-probabilities and a target margin ``γ``;

and, with ``sft_weight`` w > 0, RPO's ``+ w · NLL(chosen)`` per token (Pang et al. 2024; TRL's
``loss_type=["sigmoid", "sft"]``), which keeps DPO from lowering the chosen answers' likelihood.

The reference is a :class:`Reference`: a frozen copy of the model, or — for a model trained
through an adapter — the same model with its adapter switched off, so no second copy is held in
memory. Its log-probabilities are computed once per pair and kept (``cache=True``): pairs come
back every epoch, and the reference never changes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.data.preferences import as_rows
from kvlab.errors import ConfigError
from kvlab.models.modes import eval_mode
from kvlab.training.objectives import Objective

DPO_LOSSES = ("sigmoid", "ipo", "simpo")


def completion_logps(model: nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor,
                     completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its completion tokens and their number, ``(R,)`` each:
    token ``t`` is predicted from the logits at ``t − 1``."""
    per_token = token_logps(model(tokens, attention_mask=attention_mask)[:, :-1], tokens[:, 1:])
    mask = completion_mask[:, 1:].bool()
    return (per_token * mask).sum(-1), mask.sum(-1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` per position (bf16 logits scored in fp32)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model inside the block: LoRA updates and prompt adapters switched off."""
    from kvlab.peft.lora import lora_layers

    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise ConfigError("the adapter is merged into the weights, so it cannot be switched off for a reference; "
                          "keep it unmerged while training")
    prompt = getattr(model, "prompt_adapter", None)
    for layer in layers:
        layer.disabled = True
    model.prompt_adapter = None
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        model.prompt_adapter = prompt


@dataclass
class Reference:
    """The reference policy of DPO (and of GRPO's KL term): ``model`` frozen, or ``None`` for the
    trained model with its adapter switched off. ``cache`` keeps each pair's reference
    log-probabilities by pair id."""

    model: nn.Module | None = None
    cache: bool = True
    _memo: dict[int, tuple[float, float]] = field(default_factory=dict, repr=False)

    def logps(self, policy: nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor,
              completion_mask: torch.Tensor, pair_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Summed reference log-probabilities ``(2B,)`` of the rows ``(2B, T)`` (chosen rows first)."""
        B = tokens.shape[0] // 2
        ids = [int(i) for i in pair_ids] if pair_ids is not None and self.cache else None
        if ids is not None and all(i in self._memo for i in ids):
            chosen, rejected = zip(*(self._memo[i] for i in ids))
            return torch.tensor([*chosen, *rejected], dtype=torch.float32, device=tokens.device)
        out, _ = self.run(policy, lambda m: completion_logps(m, tokens, attention_mask, completion_mask))
        if ids is not None:
            for k, i in enumerate(ids):
                self._memo[i] = (float(out[k]), float(out[B + k]))
        return out

    @torch.no_grad()
    def run(self, policy: nn.Module, fn):
        """``fn(reference)`` without gradients: on the frozen model, or on ``policy`` with its
        adapter switched off (in eval mode: no dropout in a reference)."""
        if self.model is not None:
            return fn(self.model)
        with eval_mode(policy), adapters_disabled(policy):
            return fn(policy)

    def frozen(self) -> list[nn.Module]:
        return [self.model] if self.model is not None else []


class RewardLoss(Objective):
    """Bradley–Terry loss of a reward model (a model with a score head), summed over pairs."""

    name = "reward"

    def __init__(self, center_coefficient: float | None = None):
        if center_coefficient is not None and not center_coefficient >= 0:
            raise ConfigError(f"center_coefficient={center_coefficient!r} must be a non-negative number")
        self.center_coefficient = center_coefficient

    def rewards(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, attention_mask = as_rows(batch[0]), as_rows(batch[1])
        r = _unwrap(model).sequence_scores(tokens, attention_mask=attention_mask)[:, 0]
        r = r.to(torch.promote_types(r.dtype, torch.float32))
        return r.chunk(2)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        chosen, rejected = self.rewards(model, batch)
        loss = -F.logsigmoid(chosen - rejected)
        if self.center_coefficient:
            loss = loss + self.center_coefficient * (chosen + rejected) ** 2
        return loss.sum()

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].shape[0]


class DPOLoss(Objective):
    """DPO and its variants (``loss_type``: sigmoid, ipo, simpo), summed over pairs."""

    name = "dpo"

    def __init__(self, reference: Reference | None = None, *, beta: float = 0.1, loss_type: str = "sigmoid",
                 simpo_gamma: float = 0.5, sft_weight: float = 0.0):
        if loss_type not in DPO_LOSSES:
            raise ConfigError(f"loss_type={loss_type!r} is not one of {list(DPO_LOSSES)}")
        if not beta > 0:
            raise ConfigError(f"beta={beta!r} must be positive (DPO's inverse temperature; 0.1 is usual)")
        if loss_type != "simpo" and reference is None:
            raise ConfigError(f"{loss_type} compares the policy with a reference; give Reference(model) or "
                              f"Reference() for an adapter's base (simpo needs none)")
        if not sft_weight >= 0:
            raise ConfigError(f"sft_weight={sft_weight!r} must be a non-negative number (RPO uses 1.0)")
        self.reference, self.beta, self.loss_type, self.simpo_gamma = reference, beta, loss_type, simpo_gamma
        self.sft_weight = sft_weight

    def frozen_models(self) -> list[nn.Module]:
        return self.reference.frozen() if self.reference is not None else []

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        tokens, attention_mask, completion_mask = (as_rows(t) for t in batch[:3])
        rest = batch[3:]
        logps, counts = completion_logps(model, tokens, attention_mask, completion_mask)
        pair_ids = rest[0] if rest else None
        return self._preference(model, tokens, attention_mask, completion_mask, pair_ids, logps, counts) + \
            self._sft(logps, counts)

    def _sft(self, logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """RPO's term (TRL's ``loss_type=[..., "sft"]``): the chosen completions' negative
        log-likelihood per token over the batch, weighted by ``sft_weight`` (times the pairs, as the
        loop divides by them) — it keeps the chosen answers likely while DPO separates the pair."""
        if not self.sft_weight:
            return logps.new_zeros(())
        chosen, chosen_n = logps.chunk(2)[0], counts.chunk(2)[0]
        return -self.sft_weight * chosen.sum() / chosen_n.sum().clamp_min(1) * chosen.shape[0]

    def _preference(self, model, tokens, attention_mask, completion_mask, pair_ids, logps, counts):
        n = counts.clamp_min(1).float()
        if self.loss_type == "simpo":
            avg = logps / n
            chosen, rejected = avg.chunk(2)
            return -F.logsigmoid(self.beta * (chosen - rejected) - self.simpo_gamma).sum()
        ref = self.reference.logps(model, tokens, attention_mask, completion_mask, pair_ids)
        ratios = logps - ref
        if self.loss_type == "ipo":
            ratios = ratios / n
            chosen, rejected = ratios.chunk(2)
            return ((chosen - rejected - 1 / (2 * self.beta)) ** 2).sum()
        chosen, rejected = ratios.chunk(2)
        return -F.logsigmoid(self.beta * (chosen - rejected)).sum()

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].shape[0]


def _unwrap(model: nn.Module) -> nn.Module:
    """The kvlab model under a DDP wrapper."""
    return getattr(model, "module", model)


@torch.no_grad()
def pairwise_accuracy(model: nn.Module, batches) -> dict:
    """A reward model's accuracy on preference pairs: the share with ``r⁺ > r⁻`` (ties count half),
    and the mean margin ``r⁺ − r⁻``."""
    wins, margin, n = 0.0, 0.0, 0
    with eval_mode(model):
        for batch in batches:
            batch = tuple(t.to(model.device) for t in batch)
            chosen, rejected = RewardLoss().rewards(model, batch)
            wins += float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())
            margin += float((chosen - rejected).sum())
            n += chosen.numel()
    return {"accuracy": wins / max(n, 1), "margin": margin / max(n, 1), "pairs": n}

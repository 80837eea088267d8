"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, with the rank budget moved to where it matters.

Each adapted layer learns ``ΔW = P Λ Q`` — ``P (out × r)`` and ``Q (r × in)`` kept near-orthogonal
by the regulariser ``‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F``, ``Λ`` a vector of ``r`` singular values. Training
starts with ``init_r`` triplets per layer; the :class:`RankAllocator` scores every triplet by the
smoothed sensitivity ``|w · ∂L/∂w|`` of its parameters times its uncertainty, and zeroes the
singular values of the lowest-scoring ones, lowering the total budget from ``init_r × layers`` to
``target_r × layers`` on the paper's cubic schedule: ``init_warmup`` steps at the full budget, then
cubic decay, then ``final_warmup`` steps at the target budget with the final mask fixed.

Parameter names follow PEFT's AdaLoRA (``lora_A`` = Q, ``lora_E`` = Λ, ``lora_B`` = P) and the
update ``B (A ⊙ E) · α / r``, so an :class:`AdaLoraLinear` is a :class:`LoraLinear` whose low-rank
pair is ``(A ⊙ E, B)`` — merge, unmerge, saving and PEFT export (as plain LoRA) are shared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from kvlab.errors import ConfigError
from kvlab.peft.lora import ATTENTION_TARGETS, LoraConfig, LoraLinear, adapted_shapes, apply_lora, lora_layers


@dataclass
class AdaLoraConfig:
    init_r: int = 12
    target_r: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_TARGETS
    total_steps: int = 1000          # the schedule's length (set from the training run)
    init_warmup: int | None = None   # steps at the initial budget (default 10 % of total)
    final_warmup: int | None = None  # steps at the target budget, mask fixed (default 30 %)
    mask_interval: int = 10          # re-allocate every this many steps during the decay
    beta1: float = 0.85              # smoothing of the sensitivity
    beta2: float = 0.85              # smoothing of its uncertainty
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        for name in ("init_r", "target_r", "total_steps", "mask_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"AdaLoRA {name}={v!r} must be a positive integer")
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoRA target_r={self.target_r} exceeds init_r={self.init_r}; the budget only shrinks")
        if self.init_warmup is None:
            self.init_warmup = self.total_steps // 10
        if self.final_warmup is None:
            self.final_warmup = (3 * self.total_steps) // 10
        if self.init_warmup < 0 or self.final_warmup < 0 or self.init_warmup + self.final_warmup >= self.total_steps:
            raise ConfigError(f"AdaLoRA init_warmup={self.init_warmup} + final_warmup={self.final_warmup} must be "
                              f"below total_steps={self.total_steps} to leave steps for the budget to decay")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"AdaLoRA {name}={getattr(self, name)!r} must be in [0, 1)")
        _ = self.lora  # validates alpha, dropout, targets

    @property
    def lora(self) -> LoraConfig:
        # alpha / r scaling of LoRA with r = init_r: the update is B(A⊙E)·α/r, as in PEFT.
        return LoraConfig(r=self.init_r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


class AdaLoraLinear(LoraLinear):
    """``y = x Wᵀ + b + (α/r) · B (A ⊙ E) x`` with ``E`` the (prunable) singular values."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        super().__init__(base, cfg)
        # The paper's init: P, Q random, Λ zero (so the adapted model starts equal to its base).
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.lora_E = nn.Parameter(torch.zeros(cfg.r, 1, dtype=self.lora_A.dtype, device=self.lora_A.device))

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A * self.lora_E, self.lora_B, self.scaling

    def active_rank(self) -> int:
        return int((self.lora_E.detach() != 0).sum())


def apply_adalora(model: nn.Module, cfg: AdaLoraConfig) -> "RankAllocator":
    apply_lora(model, cfg.lora, layer_class=AdaLoraLinear)
    model.adalora_config = cfg
    return RankAllocator(model, cfg)


def adalora_parameter_count(model_cfg, cfg: AdaLoraConfig) -> int:
    """Closed form: ``r · (in + out) + r`` (P, Q and Λ) per adapted layer at ``r = init_r``."""
    return sum(cfg.init_r * (i + o + 1) for i, o in adapted_shapes(model_cfg, cfg.target_modules))


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """Mean over adapted matrices of ``‖PᵀP − I‖²_F`` and ``‖QQᵀ − I‖²_F``."""
    terms = []
    for layer in lora_layers(model).values():
        if isinstance(layer, AdaLoraLinear):
            for m in (layer.lora_A, layer.lora_B.T):          # both as (r × n): rows orthonormal
                gram = m.float() @ m.float().T
                terms.append((gram - torch.eye(gram.shape[0], device=gram.device)).pow(2).sum())
    return torch.stack(terms).mean()


class RankAllocator:
    """The importance scores and the budget schedule; the training loop calls
    :meth:`regularizer` (added to the loss) and :meth:`after_step` (with gradients still present)."""

    def __init__(self, model: nn.Module, cfg: AdaLoraConfig):
        self.model, self.cfg = model, cfg
        self.layers = {n: m for n, m in lora_layers(model).items() if isinstance(m, AdaLoraLinear)}
        self.init_budget = cfg.init_r * len(self.layers)
        self.target_budget = cfg.target_r * len(self.layers)
        self.ipt: dict[str, torch.Tensor] = {}       # smoothed sensitivity per parameter
        self.unc: dict[str, torch.Tensor] = {}       # smoothed uncertainty per parameter
        self.budget = self.init_budget
        self._final_mask: dict[str, torch.Tensor] | None = None   # fixed once the final phase starts

    def regularizer(self) -> torch.Tensor:
        return self.cfg.orth_reg_weight * orthogonality_penalty(self.model)

    def budget_at(self, step: int) -> tuple[int, bool]:
        """``(budget, re-mask now)`` after optimizer step ``step`` (1-based), the paper's cubic schedule."""
        cfg = self.cfg
        if step <= cfg.init_warmup:
            return self.init_budget, False
        decay_end = cfg.total_steps - cfg.final_warmup
        if step > decay_end:
            return self.target_budget, True
        left = 1 - (step - cfg.init_warmup) / (decay_end - cfg.init_warmup)
        budget = int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget)
        return budget, step % cfg.mask_interval == 0

    @torch.no_grad()
    def _update_scores(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, layer in self.layers.items():
            for leaf in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, leaf)
                if p.grad is None:
                    continue
                key = f"{name}.{leaf}"
                ipt = (p * p.grad).abs().float()
                if key not in self.ipt:
                    self.ipt[key], self.unc[key] = torch.zeros_like(ipt), torch.zeros_like(ipt)
                self.ipt[key].mul_(b1).add_(ipt, alpha=1 - b1)
                self.unc[key].mul_(b2).add_((ipt - self.ipt[key]).abs(), alpha=1 - b2)

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per layer, ``(r,)``: the score of Λᵢ plus the mean scores of Pᵢ's and Qᵢ's entries."""
        out = {}
        for name in self.layers:
            s = {leaf: self.ipt[f"{name}.{leaf}"] * self.unc[f"{name}.{leaf}"]
                 for leaf in ("lora_A", "lora_B", "lora_E")}
            out[name] = s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0)
        return out

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Update the importance scores from this step's gradients; mask to the budget when due."""
        if step > self.cfg.total_steps - self.cfg.final_warmup and self._final_mask:
            for name, keep in self._final_mask.items():          # the final pattern stays fixed
                self.layers[name].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            return
        self._update_scores()
        self.budget, due = self.budget_at(step)
        if not due or not self.ipt or self.budget >= self.init_budget:
            return
        scores = self._triplet_scores()
        flat = torch.cat(list(scores.values()))
        threshold = torch.kthvalue(flat, self.init_budget - self.budget).values
        keep = {name: s > threshold for name, s in scores.items()}
        for name, k in keep.items():
            self.layers[name].lora_E.masked_fill_(~k.view(-1, 1), 0.0)
        if step >= self.cfg.total_steps - self.cfg.final_warmup:
            self._final_mask = keep

    def ranks(self) -> dict[str, int]:
        return {name: layer.active_rank() for name, layer in self.layers.items()}

    # Exact resume: the smoothed scores are training state.
    def state_dict(self) -> dict:
        return {"ipt": self.ipt, "unc": self.unc, "budget": self.budget,
                "final_mask": self._final_mask}

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.unc, self.budget = state["ipt"], state["unc"], state["budget"]
        self._final_mask = state.get("final_mask")

"""How ``kvlab shrink`` spends its budget: each recovered candidate's steps of attention transfer and
of distillation, from a token budget or from measured step times and the minutes left, with a
wall-clock deadline per candidate so that the run keeps its minutes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvlab.recipes.shrink.candidates import FAMILIES, Candidate
from kvlab.recipes.shrink.config import ShrinkConfig


@dataclass
class StepTimes:
    """Measured seconds per training step of each stage, and what the run spends besides training."""

    transfer_s: float
    kd_s: float
    eval_s: float        # one model's final proxy, evaluation, trust suite, decode speeds and saving
    proxy_s: float       # one proxy measurement (a curve point)
    refit_s: float       # the output refit, when asked for


def transfer_fraction(scfg: ShrinkConfig, cand: Candidate) -> float:
    """The share of ``cand``'s tokens spent on attention transfer: none for a start fitted by the loss
    that is close to the original (a family exact at full width). Transfer fits each layer's attention
    output in squared error, which such a start trades away on purpose where the loss does not notice:
    on SmolLM2 at KV/2, 10 transfer steps took the allocated low-rank start from proxy perplexity 10.54
    to 11.42, while for plain-PCA starts they help distillation. An MLA start, fitted by the loss or
    not, is far from the original (its key channels lost their rotation): transfer is kept."""
    exact = FAMILIES[cand.family].exact_at_full_width
    return 0.0 if cand.loss_fitted and exact else scfg.transfer_fraction


def split_by_tokens(scfg: ShrinkConfig, chosen: list[Candidate], tokens_per_step: int) -> list[tuple[int, int]]:
    """A token budget: an equal share per candidate that has something to train (a quantized cache
    of the original structure has not), split transfer : distillation by its fraction."""
    trained = [c for c in chosen if c.restructured]
    share = scfg.tokens // max(1, len(trained)) // tokens_per_step
    out = []
    for cand in chosen:
        s, f = (share, transfer_fraction(scfg, cand)) if cand.restructured else (0, 0.0)
        out.append((round(s * f), s - round(s * f)))
    return out


def split_by_time(scfg: ShrinkConfig, chosen: list[Candidate], times: StepTimes,
                  now: float) -> tuple[list[tuple[int, int]], dict]:
    """A time budget: each candidate gets an equal share of what is left — its refit, its training
    (with the recovery curve's points) and then its final scoring — and a deadline (elapsed seconds)
    at the end of its share; one with nothing to train only its scoring. Returns the steps and the
    timing record."""
    trained = sum(c.restructured for c in chosen)
    seconds = scfg.minutes * 60 - now - 30
    scoring = times.eval_s * (len(chosen) - trained)           # the others are scored, never trained
    per = max(0.0, (seconds - scoring) / max(1, trained))
    split, deadlines, t = [], [], now
    for cand in chosen:
        if not cand.restructured:
            split.append((0, 0))
            t += times.eval_s
            deadlines.append(t)
            continue
        f = transfer_fraction(scfg, cand)
        train_s = per - times.eval_s - times.refit_s - (1 + (0 < f < 1)) * scfg.curve_points * times.proxy_s
        n = int(train_s / (f * times.transfer_s + (1 - f) * times.kd_s)) if train_s > 0 else 0
        split.append((round(n * f), n - round(n * f)))
        # The step times are measured but vary by 10-30 % between runs on a shared machine: training
        # also stops at each candidate's deadline, so the run keeps its minutes.
        t += per
        deadlines.append(t - times.eval_s)
    timing = {"transfer_s_per_step": times.transfer_s, "kd_s_per_step": times.kd_s,
              "train_seconds": max(0.0, seconds), "deadlines_s": deadlines}
    return split, timing


def seconds_per_step(model, objective, batch, train_only: str, device) -> float:
    """Wall time of one training step (forward and backward) of ``objective``, measured."""
    from kvlab.training.loop import trainable_parameters

    objective.prepare(torch.device(device))
    trainable_parameters(model, train_only)
    model.train()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        (objective.loss(model, tuple(x.to(device) for x in batch)) / max(1, objective.count(batch))).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    model.eval()
    # The optimizer step (of the trainable part) and logging come on top, but in the runs so far the
    # loop's steps were 10-15 % faster than this measurement anyway (SmolLM2 distillation on 2 cores:
    # 8.3-8.6 s against 9.3-10.0 s measured), so no margin is added.
    return min(times[1:])


def attach_mlp_lora(model, scfg: ShrinkConfig) -> None:
    """``--train lora``: LoRA (alpha = 2 r) on every MLP projection; the attention trains in full."""
    from kvlab.peft.lora import LoraConfig, apply_lora

    apply_lora(model, LoraConfig(r=scfg.lora_rank, alpha=2.0 * scfg.lora_rank,
                                 target_modules=("gate_proj", "up_proj", "down_proj")))

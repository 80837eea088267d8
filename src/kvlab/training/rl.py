"""Online RL: GRPO (Shao et al. 2024, DeepSeekMath) and PPO (:class:`PPOLoss`: a value head,
GAE, clipped policy and value losses, a per-token KL penalty), with rollouts from kvlab's batched
cached generation — on any attention kind, so a model with a smaller KV cache samples faster.

A step's batch is ``B`` prompts (:class:`PromptBatches`). For each, :class:`GRPOLoss` samples ``G``
completions in one batched ``generate`` call (the model in eval mode, a seed fixed by the step and
the prompts' places in the run, so a resumed run samples what it would have), scores them with a
reward function — a verifiable checker (:class:`ExactMatchReward`, the built-in tasks' answers) or
a reward model (:class:`RewardModelReward`) — and normalises each group:
``A_i = (r_i − mean(r)) / (std(r) + 1e-4)`` (``scale_rewards="group"``; ``"batch"``: the batch's
std; ``"none"``: not divided). The per-token loss is TRL's::

    ratio = exp(logp − logp_old)
    loss_t = −min(ratio·A, clip(ratio, 1−ε_low, 1+ε_high)·A) + β·ratio·KL_t
    KL_t  = exp(ref − logp) − (ref − logp) − 1          (k3 estimator, to the reference policy)

(the ``ratio`` on the KL term: ``kl_bias_correction``, on by default as in TRL).

reduced per ``loss_type``: ``grpo`` — each completion's mean over its tokens, averaged over
completions; ``dr_grpo`` — the token sum over ``completions × max_new_tokens`` (Dr. GRPO). Both
count completions, so the loop's division by :meth:`GRPOLoss.count` gives TRL's values.

**Sample reuse.** Rollouts are expensive, so one batch of them can feed several optimizer
updates: ``num_iterations`` passes over it (TRL's GRPO ``num_iterations``, PPO's
``num_ppo_epochs``), each split into ``mini_batches`` shuffled parts (an update each). The loop
asks :meth:`GRPOLoss.batch_for_update` for update ``u`` of the step's ``updates_per_batch``: at
``u = 0`` the objective samples the whole batch's rollouts and, under no gradient, what every update
needs from the policy *as it sampled* — ``logp_old``, the reference's log-probabilities (once per
rollout, not per update), and for PPO the old values, GAE advantages and returns, whitened over the
whole batch — and keeps them in a :class:`Rollouts` buffer; each update then reads its rows. From
the second update on the policy has moved, ``ratio ≠ 1``, and the clipping bounds how far one batch
of samples can pull it. With one update per batch ``logp_old`` is the current ``logp`` detached
(no extra pass), as in TRL. A step of the loop is one batch of rollouts, so checkpoints fall
between rollout batches and a resumed run is exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from kvlab.data.chat import epoch_indices
from kvlab.errors import ConfigError
from kvlab.models.modes import eval_mode
from kvlab.training.objectives import Objective
from kvlab.training.preference import Reference, token_logps

LOSS_TYPES = ("grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class PromptBatches:
    """Step-determined batches of prompts: ``(prompt_tokens (B, Tp) left-padded, prompt_mask,
    prompt_ids (B,), step (B,))`` from token-id lists (a reward reads a prompt's id to find what
    to check its completions against)."""

    prompts: Sequence[Sequence[int]]
    pad_id: int
    batch_size: int
    seed: int = 0
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("no prompts to train on")
        self.rows = list(self.prompts)
        self.stats = {"prompts": len(self.rows), "longest": max(len(p) for p in self.rows)}

    def batch(self, i: int) -> tuple[torch.Tensor, ...]:
        from kvlab.inference.generation import left_pad

        idx = epoch_indices(i, self.batch_size, len(self.rows), self.seed)
        tokens, mask = left_pad([self.rows[j] for j in idx], self.pad_id, torch.device("cpu"))
        if mask is None:
            mask = torch.ones_like(tokens)
        return tokens, mask, torch.from_numpy(idx), torch.full((len(idx),), i, dtype=torch.long)


def prompts_from_conversations(tokenizer, conversations: Sequence[Sequence[dict]]) -> tuple[list[list[int]], list[str]]:
    """Chat tasks -> (the prompt of each conversation without its last, assistant, message, rendered
    with the generation prompt; that message's content, the answer a checker compares with)."""
    prompts, answers = [], []
    for c in conversations:
        if c[-1]["role"] != "assistant":
            raise ConfigError("every conversation must end with the assistant's answer (what the reward checks)")
        prompts.append(tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True))
        answers.append(c[-1]["content"].strip())
    return prompts, answers


class ExactMatchReward:
    """1 when the completion, decoded without its stop tokens and stripped, equals the prompt's
    answer, else 0 — the built-in tasks' verifiable reward."""

    name = "exact_match"

    def __init__(self, tokenizer, answers: Sequence[str], stop_tokens: Sequence[int] = ()):
        self.tokenizer, self.answers, self.stop = tokenizer, list(answers), set(stop_tokens)

    def __call__(self, prompt_ids: Sequence[int], prompts: Sequence[Sequence[int]],
                 completions: Sequence[Sequence[int]]) -> torch.Tensor:
        out = []
        for p, c in zip(prompt_ids, completions):
            text = self.tokenizer.decode([t for t in c if t not in self.stop], skip_special_tokens=True).strip()
            out.append(float(text == self.answers[int(p)]))
        return torch.tensor(out)


class RewardModelReward:
    """The score of a reward model (a model with a score head, :mod:`kvlab.models.heads`) on
    prompt + completion, read at the last token."""

    name = "reward_model"

    def __init__(self, model: nn.Module, batch_size: int = 16):
        if not getattr(model.cfg, "score_outputs", None):
            raise ConfigError("the reward model has no score head; train one with kvlab finetune --objective reward "
                              "(and --merge), or add_score_head")
        self.model, self.batch_size = model, batch_size

    @torch.no_grad()
    def __call__(self, prompt_ids, prompts, completions) -> torch.Tensor:
        self.model.eval()
        scores = []
        rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            width = max(map(len, chunk))
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, row in enumerate(chunk):          # right-padded: the head reads each row's last real token
                tokens[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
            dev = self.model.device
            scores.append(self.model.sequence_scores(tokens.to(dev), attention_mask=mask.to(dev))[:, 0].float())
        return torch.cat(scores).cpu()


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """``(N,)`` rewards in groups of ``group`` consecutive completions -> advantages (TRL's formula:
    minus the group mean, divided by the group's — or the batch's — sample std + 1e-4)."""
    if scale not in SCALE_REWARDS:
        raise ConfigError(f"scale_rewards={scale!r} is not one of {list(SCALE_REWARDS)}")
    grouped = rewards.view(-1, group)
    advantages = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if scale == "group":
        std = grouped.std(1, keepdim=True).expand_as(grouped).flatten() if group > 1 else torch.zeros_like(rewards)
    elif scale == "batch":
        std = (rewards.std() if rewards.numel() > 1 else torch.zeros(())).expand_as(rewards)
    else:
        return advantages
    return advantages / (std + 1e-4)


def completion_token_logps(model: nn.Module, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                           completion: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """``(N, Tc)``: log p(completion token | prompt and the completion before it) for left-padded
    prompts followed by right-padded completions."""
    tokens = torch.cat([prompt, completion], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    return token_logps(model(tokens, attention_mask=mask)[:, prompt.shape[1] - 1:-1], completion)


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
                    epsilon_high: float = 0.2, kl_ratio: bool = False) -> torch.Tensor:
    """The per-token GRPO loss ``(N, Tc)`` (see the module docstring), zero outside ``mask``;
    ``kl_ratio``: the KL term multiplied by the ratio (see :class:`GRPOLoss`)."""
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(1)
    loss = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * a)
    if beta:
        if ref_logps is None:
            raise ConfigError("a KL term (beta > 0) needs the reference's log-probabilities")
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        loss = loss + beta * (kl * ratio if kl_ratio else kl)
    return loss * mask


def reduce_grpo_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """The batch's loss *summed over completions* (the loop divides by their number)."""
    if loss_type == "grpo":
        return (per_token.sum(1) / mask.sum(1).clamp_min(1)).sum()
    return per_token.sum() / max_new_tokens


class Rollouts(NamedTuple):
    """One batch of sampled completions and what every update on it needs, row-first (``N`` rows,
    groups of ``G`` consecutive): the loop slices it into updates' rows and micro-batches."""

    prompt: torch.Tensor            # (N, Tp) left-padded
    prompt_mask: torch.Tensor
    completion: torch.Tensor        # (N, Tc) right-padded
    completion_mask: torch.Tensor
    advantages: torch.Tensor        # (N,) GRPO; (N, Tc) PPO (GAE, whitened)
    old_logps: torch.Tensor         # (N, Tc) the sampling policy's; unused (zeros) with one update per batch
    ref_logps: torch.Tensor         # (N, Tc) the reference's; zeros without a KL term
    old_values: torch.Tensor        # (N, Tc) PPO's value head as it sampled; zeros for GRPO
    returns: torch.Tensor           # (N, Tc) PPO's value targets; zeros for GRPO


class GRPOLoss(Objective):
    """Group relative policy optimisation on :class:`PromptBatches` (see the module docstring).

    ``kl_bias_correction`` (default on, as TRL's ``use_bias_correction_kl``): the k3 KL term is
    multiplied by the ratio, which makes its gradient the unbiased gradient of the reverse KL for
    samples of the old policy (DeepSeek-V3.2). Its value is unchanged at ratio 1; its gradient is
    not, even then, since the ratio is differentiable."""

    name = "grpo"
    MIN_GENERATIONS = 2

    def __init__(self, reward: Callable, *, num_generations: int = 8, max_new_tokens: int = 32,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 beta: float = 0.0, reference: Reference | None = None, epsilon: float = 0.2,
                 epsilon_high: float | None = None, loss_type: str = "grpo", scale_rewards: str = "group",
                 num_iterations: int = 1, mini_batches: int = 1, forward_batch_size: int = 32,
                 kl_bias_correction: bool = True, stop_tokens: Sequence[int] = (), pad_id: int = 0, seed: int = 0):
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type={loss_type!r} is not one of {list(LOSS_TYPES)}")
        if scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"scale_rewards={scale_rewards!r} is not one of {list(SCALE_REWARDS)}")
        if not isinstance(num_generations, int) or num_generations < self.MIN_GENERATIONS:
            raise ConfigError(f"num_generations={num_generations!r} must be at least {self.MIN_GENERATIONS} "
                              f"(GRPO's advantages compare the completions of one prompt)")
        for name, value in (("max_new_tokens", max_new_tokens), ("num_iterations", num_iterations),
                            ("mini_batches", mini_batches), ("forward_batch_size", forward_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature!r} must be positive: GRPO samples its groups")
        if beta < 0 or not 0 < epsilon < 1:
            raise ConfigError(f"beta={beta!r} must be >= 0 and epsilon={epsilon!r} in (0, 1)")
        if beta and reference is None:
            raise ConfigError("beta > 0 adds a KL term to a reference; give Reference(model) or Reference() for an "
                              "adapter's base")
        self.reward, self.G, self.max_new_tokens = reward, num_generations, max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.beta, self.reference, self.loss_type, self.scale_rewards = beta, reference, loss_type, scale_rewards
        self.epsilon_low, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.num_iterations, self.mini_batches = num_iterations, mini_batches
        self.updates_per_batch = num_iterations * mini_batches
        self.forward_batch_size, self.kl_bias_correction = forward_batch_size, kl_bias_correction
        self.stop, self.pad_id, self.seed = list(stop_tokens), pad_id, seed
        self._metrics: dict[str, list[float]] = {}
        self._buffer: Rollouts | None = None
        self._buffer_step: int | None = None

    @property
    def reuses_samples(self) -> bool:
        return self.updates_per_batch > 1

    def frozen_models(self) -> list[nn.Module]:
        return self.reference.frozen() if self.reference is not None else []

    def update_rows(self, rows: int) -> int:
        n = rows * self.G
        if n % self.mini_batches:
            raise ConfigError(f"{rows} prompt(s) x {self.G} generation(s) = {n} rollouts per process do not split into "
                              f"mini_batches={self.mini_batches} equal parts; change the batch size or mini_batches")
        return n // self.mini_batches

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].shape[0]          # an update's rollouts (completions)

    # ------------------------------------------------------------------------------ rollouts
    def batch_for_update(self, model: nn.Module, batch: tuple[torch.Tensor, ...], update: int) -> Rollouts:
        """Update ``update`` of a step on ``batch`` (prompts): at 0 the step's rollouts are sampled
        and scored (:meth:`collect`); every update then reads its own rows of them — all of them
        with ``mini_batches=1``, else the ``update % mini_batches``-th part of a permutation drawn
        from the run's seed, the step and the pass."""
        step = int(batch[3][0])
        if update == 0:
            self._buffer, self._buffer_step = self.collect(getattr(model, "module", model), batch), step
        elif self._buffer_step != step:
            raise ConfigError(f"update {update} of step {step + 1} has no rollouts: a step's updates start at 0")
        n = self._buffer.prompt.shape[0]
        if self.mini_batches == 1:
            return self._buffer
        part, rows = update % self.mini_batches, n // self.mini_batches
        order = np.random.default_rng([self.seed, step, update // self.mini_batches]).permutation(n)
        idx = torch.from_numpy(np.sort(order[part * rows:(part + 1) * rows]))
        return Rollouts(*(t[idx] for t in self._buffer))

    def sample(self, model: nn.Module, batch: tuple[torch.Tensor, ...]):
        """Sample G completions per prompt: ``(prompts (N, Tp), prompt_mask, completions (N, Tc)
        right-padded, completion_mask, prompt_ids (N,), rewards (N,))`` with N = B·G, groups consecutive."""
        from kvlab.inference.generation import generate

        tokens, mask, prompt_ids, step = batch
        rows = [tokens[i][mask[i].bool()].tolist() for i in range(tokens.shape[0]) for _ in range(self.G)]
        # The seed of a batch: the run's seed, the step and the first prompt's place in the step.
        seed = (self.seed * 1_000_003 + int(step[0]) * 7_919 + int(prompt_ids[0])) % 2**63
        t0 = time.perf_counter()
        with eval_mode(model):
            outs = generate(model, rows, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, seed=seed, stop_tokens=self.stop)
        elapsed = time.perf_counter() - t0
        ids = prompt_ids.repeat_interleave(self.G)
        rewards = self.reward(ids.tolist(), rows, outs).float()
        width = max(1, max(len(o) for o in outs))
        completion = torch.full((len(outs), width), self.pad_id, dtype=torch.long)
        completion_mask = torch.zeros(len(outs), width, dtype=torch.long)
        for r, o in enumerate(outs):
            completion[r, :len(o)] = torch.tensor(o, dtype=torch.long)
            completion_mask[r, :len(o)] = 1
        n_new = sum(len(o) for o in outs)
        self._note(reward=float(rewards.mean()), completion_tokens=n_new / len(outs),
                   rollout_tokens_per_s=n_new / max(elapsed, 1e-9))
        dev = model.device
        return (tokens.repeat_interleave(self.G, 0).to(dev), mask.repeat_interleave(self.G, 0).to(dev),
                completion.to(dev), completion_mask.to(dev), ids, rewards.to(dev))

    def _chunked(self, fn: Callable, *tensors: torch.Tensor) -> torch.Tensor:
        """``fn`` over rows in chunks of ``forward_batch_size``, under no gradient, concatenated."""
        with torch.no_grad():
            return torch.cat([fn(*(t[s:s + self.forward_batch_size] for t in tensors))
                              for s in range(0, tensors[0].shape[0], self.forward_batch_size)])

    def _reference_logps(self, model: nn.Module, prompt, prompt_mask, completion, completion_mask) -> torch.Tensor:
        return self.reference.run(model, lambda r: self._chunked(
            lambda *t: completion_token_logps(r, *t), prompt, prompt_mask, completion, completion_mask))

    def collect(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> Rollouts:
        """The step's rollouts, rewards, group advantages, and — under no gradient, once — the
        sampling policy's log-probabilities (only when samples are reused) and the reference's."""
        prompt, prompt_mask, completion, completion_mask, _, rewards = self.sample(model, batch)
        advantages = group_advantages(rewards, self.G, self.scale_rewards)
        zeros = torch.zeros(completion.shape, dtype=torch.float32, device=completion.device)
        old = ref = zeros
        with eval_mode(model):
            if self.reuses_samples:
                old = self._chunked(lambda *t: completion_token_logps(model, *t).float(), prompt, prompt_mask,
                                    completion, completion_mask)
            if self.beta:
                ref = self._reference_logps(model, prompt, prompt_mask, completion, completion_mask).float()
        return Rollouts(prompt, prompt_mask, completion, completion_mask, advantages.float(), old, ref, zeros, zeros)

    # ---------------------------------------------------------------------------------- loss
    def _ratio_terms(self, logps: torch.Tensor, r: Rollouts, m: torch.Tensor) -> torch.Tensor:
        """``logp_old`` for this update (the buffer's, or ``logps`` detached with one update per
        batch), noting the share of completion tokens whose ratio the clipping holds."""
        old = r.old_logps.to(logps.dtype) if self.reuses_samples else logps.detach()
        with torch.no_grad():
            ratio = torch.exp(logps - old)
            clipped = ((ratio < 1 - self.epsilon_low) | (ratio > 1 + self.epsilon_high)).to(m.dtype)
            self._note(clip_fraction=float((clipped * m).sum() / m.sum().clamp_min(1)))
        return old

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """The loss of a micro-batch of :class:`Rollouts` rows, summed over its completions."""
        r = Rollouts(*batch)
        logps = completion_token_logps(model, r.prompt, r.prompt_mask, r.completion, r.completion_mask)
        m = r.completion_mask.to(logps.dtype)
        old = self._ratio_terms(logps, r, m)
        ref = r.ref_logps.to(logps.dtype) if self.beta else None
        per_token = grpo_token_loss(logps, old, r.advantages.to(logps.dtype), m, ref_logps=ref, beta=self.beta,
                                    epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                                    kl_ratio=self.kl_bias_correction)
        if ref is not None:
            d = ref - logps.detach()
            self._note(kl=float(((torch.exp(d) - d - 1) * m).sum() / m.sum().clamp_min(1)))
        return reduce_grpo_loss(per_token, m, self.loss_type, self.max_new_tokens)

    def _note(self, **values: float) -> None:
        for k, v in values.items():
            self._metrics.setdefault(k, []).append(v)

    def pop_metrics(self) -> dict[str, float]:
        out = {k: float(np.mean(v)) for k, v in self._metrics.items()}
        self._metrics.clear()
        return out


# ------------------------------------------------------------------------------------------- PPO
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded rows ``(N, T)`` (Schulman et al. 2016):
    ``δ_t = r_t + γ V_{t+1} − V_t`` (``V`` is 0 after a row's last token), ``A_t = Σ_k (γλ)^k δ_{t+k}``;
    returns ``(advantages, returns = A + V)``, zero outside ``mask``."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        following = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` normalised to mean 0 and std 1 over the ``mask``ed entries (PPO's advantage whitening)."""
    m = mask.to(x.dtype)
    mean = (x * m).sum() / m.sum().clamp_min(1)
    var = (((x - mean) * m) ** 2).sum() / (m.sum() - 1).clamp_min(1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * m


def policy_and_values(model: nn.Module, prompt: torch.Tensor, prompt_mask: torch.Tensor, completion: torch.Tensor,
                      completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, values)`` ``(N, Tc)`` from one pass of a model with a score head: the policy's
    log-probability of each completion token and the value head's estimate at the position that
    predicts it (the state before the token)."""
    kvlab_model = getattr(model, "module", model)
    tokens = torch.cat([prompt, completion], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    h = kvlab_model.hidden_states(tokens, attention_mask=mask)[:, prompt.shape[1] - 1:-1]
    logps = token_logps(kvlab_model.lm_head(h), completion)
    values = kvlab_model.score(h)[..., 0]
    return logps, values.to(logps.dtype)


class PPOLoss(GRPOLoss):
    """PPO for language models (Ouyang et al. 2022, as TRL's PPOTrainer): one completion per prompt
    (``num_generations``), the sequence reward at its last token plus a per-token KL penalty
    ``−kl_coef · (logp_old − ref)``, GAE on a value head (the model's score head, read per token),
    advantages whitened over the whole rollout batch, the clipped policy loss and the clipped value
    loss (``vf_coef``). ``num_iterations`` is TRL's ``num_ppo_epochs`` (4, as there) and
    ``mini_batches`` its ``num_mini_batches``: see "Sample reuse" in the module
    docstring. The loss is the masked mean over the completion tokens of each micro-batch."""

    name = "ppo"
    MIN_GENERATIONS = 1

    def __init__(self, reward: Callable, *, kl_coef: float = 0.05, gamma: float = 1.0, lam: float = 0.95,
                 vf_coef: float = 0.1, cliprange_value: float = 0.2, num_generations: int = 1,
                 num_iterations: int = 4, **kw):
        reference = kw.pop("reference", None)
        super().__init__(reward, num_generations=num_generations, reference=reference, num_iterations=num_iterations,
                         **kw)
        if kl_coef < 0 or not 0 <= gamma <= 1 or not 0 <= lam <= 1 or vf_coef < 0:
            raise ConfigError(f"kl_coef={kl_coef}, gamma={gamma}, lam={lam}, vf_coef={vf_coef}: kl_coef and vf_coef "
                              f"must be >= 0, gamma and lam in [0, 1]")
        if kl_coef and reference is None:
            raise ConfigError("kl_coef > 0 penalises the distance to a reference; give Reference(model) or "
                              "Reference() for an adapter's base")
        self.kl_coef, self.gamma, self.lam = kl_coef, gamma, lam
        self.vf_coef, self.cliprange_value = vf_coef, cliprange_value

    @property
    def reuses_samples(self) -> bool:
        return True               # GAE needs the values before any update: a no-grad pass always

    def collect(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> Rollouts:
        """Rollouts, then under no gradient: the policy's log-probabilities and values as it sampled,
        the KL-penalised per-token rewards, GAE, and the advantages whitened over the whole batch."""
        if not getattr(model.cfg, "score_outputs", None):
            raise ConfigError("PPO needs a value head: add_score_head(model) before training")
        prompt, prompt_mask, completion, completion_mask, _, scores = self.sample(model, batch)
        m = completion_mask.float()
        with eval_mode(model):
            both = self._chunked(lambda *t: torch.stack([x.float() for x in policy_and_values(model, *t)], 1),
                                 prompt, prompt_mask, completion, completion_mask)
            old_logps, old_values = both[:, 0], both[:, 1]
            ref = torch.zeros_like(old_logps)
            rewards = torch.zeros_like(old_logps)
            if self.kl_coef:
                ref = self._reference_logps(model, prompt, prompt_mask, completion, completion_mask).float()
                kl = (old_logps - ref) * m
                rewards = rewards - self.kl_coef * kl
                self._note(kl=float(kl.sum() / m.sum().clamp_min(1)))
        last = (completion_mask.sum(1) - 1).clamp_min(0)
        rewards[torch.arange(len(last)), last] += scores.float()
        advantages, returns = gae(rewards, old_values, m, self.gamma, self.lam)
        return Rollouts(prompt, prompt_mask, completion, completion_mask, masked_whiten(advantages, m), old_logps,
                        ref, old_values, returns)

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        r = Rollouts(*batch)
        logps, values = policy_and_values(model, r.prompt, r.prompt_mask, r.completion, r.completion_mask)
        m = r.completion_mask.to(logps.dtype)
        old = self._ratio_terms(logps, r, m)
        advantages, old_values, returns = (t.to(logps.dtype) for t in (r.advantages, r.old_values, r.returns))
        ratio = torch.exp(logps - old)
        pg = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - self.epsilon_low,
                                                                     1 + self.epsilon_high))
        clipped_v = old_values + torch.clamp(values - old_values, -self.cliprange_value, self.cliprange_value)
        vf = 0.5 * torch.max((values - returns) ** 2, (clipped_v - returns) ** 2)
        n = m.sum().clamp_min(1)
        pg_loss, vf_loss = (pg * m).sum() / n, (vf * m).sum() / n
        self._note(value_loss=float(vf_loss.detach()), policy_loss=float(pg_loss.detach()))
        return (pg_loss + self.vf_coef * vf_loss) * r.completion.shape[0]

"""The settings of a ``kvlab finetune`` run (:class:`FinetuneConfig`): one place for each default
and the help of its flag, and the checks that settings alone allow (before any file is read)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from kvlab.errors import ConfigError
from kvlab.peft import LORA_FAMILY, AdapterSpec
from kvlab.peft.adalora import AdaLoraConfig
from kvlab.peft.lora import ATTENTION_TARGETS, LoraConfig
from kvlab.peft.prefix import PromptConfig
from kvlab.recipes.loading import ModelSource
from kvlab.recipes.options import option
from kvlab.training import TrainConfig
from kvlab.training.preference import DPO_LOSSES, DPOLoss
from kvlab.training.rl import LOSS_TYPES, GRPOLoss, PPOLoss

OBJECTIVES = ("sft", "reward", "dpo", "grpo", "ppo")
RL_OBJECTIVES = ("grpo", "ppo")
PREFERENCE_OBJECTIVES = ("reward", "dpo")
# The loss of each objective that has settings of its own: the one source of their defaults, for
# the library and the command line alike (FinetuneConfig.setting).
LOSSES = {"dpo": DPOLoss, "grpo": GRPOLoss, "ppo": PPOLoss}
LOSS_TYPES_OF = {"dpo": DPO_LOSSES, "grpo": LOSS_TYPES}


def loss_default(objective: str, name: str) -> Any:
    """The default of setting ``name`` in ``objective``'s loss class."""
    return inspect.signature(LOSSES[objective]).parameters[name].default


@dataclass(kw_only=True)
class FinetuneConfig:
    """A ``kvlab finetune`` run. Settings of one objective (the RL ones, DPO's) default to its loss
    class's; a setting that depends on the objective is None here until :meth:`setting` reads it."""

    source: ModelSource           # the base model, its device and load dtype
    method: str = option()
    objective: str = option("sft", "sft (chat data, loss on assistant tokens; default), reward (a reward model: a "
                                   "score head trained with the adapter on preference pairs, Bradley-Terry), dpo "
                                   "(preference pairs, the adapter-free base as reference), grpo (online RL on chat "
                                   "tasks: groups sampled with the KV cache, rewarded by exact match with the answer "
                                   "or by --reward-model) or ppo (the same rollouts, one per prompt by default, a "
                                   "value head, GAE and a per-token KL penalty)")
    data: str = option(help="chat JSONL (sft: also a directory or glob of them, or a weighted mix such as "
                            "sft/:0.8,extra.jsonl:0.2) or preference JSONL in TRL's formats (reward, dpo); kvlab "
                            "tasks writes both")
    eval_data: str | None = option(None, "held-out chat JSONL (sft, dpo: exact-match accuracy) or preference JSONL "
                                         "(reward: pairwise accuracy), before and after")
    eval_limit: int | None = option(None, "score at most this many held-out conversations")
    out: str = option()
    # The budget: exactly one of optimizer steps or epochs over the training rows.
    max_steps: int | None = option(None)
    epochs: float | None = option(None)
    # 16 conversations a step and LoRA's usual peak rate: on SmolLM2-135M, 150 such steps (1.2 epochs
    # of the built-in tasks) take LoRA r 8 from 0 % to 78 % task accuracy (BENCHMARKS, "Task accuracy
    # before and after fine-tuning"); prefix tuning wants a larger rate (5e-3 there).
    batch_size: int = option(16)
    grad_accum: int = option(TrainConfig.grad_accum)
    seq_len: int = option(TrainConfig.seq_len, "row length; longer conversations are truncated")
    pack: bool = option(False, "pack several conversations per row (segment-masked)")
    lr: float = option(2e-4)
    # An adapter starts at the base model (LoRA's B = 0, prefixes from real tokens' K/V), so a
    # short warm-up is enough; runs are a few hundred steps.
    warmup_steps: int = option(10)
    # No weight decay (PEFT's and TRL's trainers default to none too): it would pull prefixes and
    # virtual tokens towards zero, away from the real tokens' embeddings and K/V they start from.
    weight_decay: float = 0.0
    save_every: int = option(TrainConfig.save_every)
    keep_last: int = option(TrainConfig.keep_last)
    log_every: int = option(TrainConfig.log_every)
    seed: int = option(TrainConfig.seed)
    resume: bool = option(False, "continue from the last checkpoint in --out")
    overwrite: bool = False       # start over in a directory that holds a run (kvlab.io.rundir)
    merge: bool = option(False, "also write OUT/merged: LoRA/AdaLoRA folded into the base")
    # LoRA / QLoRA / AdaLoRA: the peft configs' defaults (AdaLoRA's alpha is LoRA's here).
    r: int = option(LoraConfig.r, "rank (AdaLoRA: the target rank)")
    init_r: int = option(AdaLoraConfig.init_r, "AdaLoRA: the initial rank")
    alpha: float = option(LoraConfig.alpha)
    dropout: float = option(LoraConfig.dropout)
    rslora: bool = option(LoraConfig.rslora, "scale by alpha/sqrt(r) instead of alpha/r")
    target_modules: str = option(",".join(ATTENTION_TARGETS), "comma-separated layer names or regular "
                                                              "expressions over full names")
    # Preference and RL objectives (None: the objective's own default, see setting()).
    beta: float | None = option(None, f"dpo: inverse temperature of the preference loss (default "
                                      f"{loss_default('dpo', 'beta'):g}); grpo: weight of the KL to the "
                                      f"adapter-free base (default {loss_default('grpo', 'beta'):g})")
    loss_type: str | None = option(None, "dpo: DPO (sigmoid, default), IPO, or SimPO (reference-free); grpo: grpo "
                                         "(per-completion mean, default) or dr_grpo (token sum over completions x "
                                         "max new tokens)")
    num_generations: int | None = option(None, f"grpo: completions per prompt (default "
                                               f"{loss_default('grpo', 'num_generations')}); ppo: (default "
                                               f"{loss_default('ppo', 'num_generations')})")
    max_new_tokens: int = option(loss_default("grpo", "max_new_tokens"), "grpo: longest completion")
    temperature: float = option(loss_default("grpo", "temperature"), "grpo: sampling temperature of the rollouts")
    epsilon: float = option(loss_default("grpo", "epsilon"), "grpo: clipping range of the ratio")
    num_iterations: int | None = option(None, f"grpo/ppo: optimizer passes over each batch of rollouts, reusing "
                                              f"them (TRL's num_iterations / num_ppo_epochs; default: grpo "
                                              f"{loss_default('grpo', 'num_iterations')}, ppo "
                                              f"{loss_default('ppo', 'num_iterations')})")
    mini_batches: int = option(loss_default("grpo", "mini_batches"), "grpo/ppo: updates per pass, each on a "
                                                                     "shuffled part of the rollouts (default "
                                                                     "%(default)s)")
    kl_coef: float = option(loss_default("ppo", "kl_coef"), "ppo: per-token KL penalty to the adapter-free base")
    vf_coef: float = option(loss_default("ppo", "vf_coef"), "ppo: weight of the value loss")
    reward_model: str | None = option(None, "grpo: score completions with this reward model (a model with a score "
                                            "head, e.g. finetune --objective reward --merge's OUT/merged) instead of "
                                            "exact match")
    simpo_gamma: float = option(loss_default("dpo", "simpo_gamma"), "dpo --loss-type simpo: the target margin")
    sft_weight: float = option(loss_default("dpo", "sft_weight"), "dpo: add this weight times the chosen answers' "
                                                                  "NLL per token (RPO; 1.0 is its choice)")
    center_rewards: float | None = option(None, "reward: centring coefficient c · (r+ + r-)^2 (e.g. 0.01)")
    # Prefix / P-tuning v2 / prompt tuning: the peft config's defaults.
    virtual_tokens: int = option(PromptConfig.num_virtual_tokens)
    reparam_hidden: int = option(PromptConfig.reparam_hidden, "prefix tuning's MLP width")

    def setting(self, name: str, otherwise: Any = None) -> Any:
        """Setting ``name`` as given, else the default of the objective's loss for it, else
        ``otherwise`` (an objective without the setting records this)."""
        given = getattr(self, name)
        if given is not None:
            return given
        loss = LOSSES.get(self.objective)
        param = inspect.signature(loss).parameters.get(name) if loss is not None else None
        return param.default if param is not None else otherwise

    @property
    def beta_value(self) -> float:
        return self.setting("beta", loss_default("dpo", "beta"))     # recorded by every objective: DPO's

    @property
    def generations(self) -> int:
        return self.setting("num_generations", 1)       # one completion per prompt where nothing samples

    @property
    def iterations(self) -> int:
        return self.setting("num_iterations", 1)        # one pass over each batch where nothing is reused

    def adapter_spec(self) -> AdapterSpec:
        """The method and its options (validated by the method's config)."""
        if self.method in LORA_FAMILY:
            options = dict(alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules.split(","))
            if self.method == "adalora":
                options.update(init_r=self.init_r, target_r=self.r)
            else:
                options.update(r=self.r, rslora=self.rslora)
        else:
            options = dict(num_virtual_tokens=self.virtual_tokens)
            if self.method == "prefix":
                options["reparam_hidden"] = self.reparam_hidden
        return AdapterSpec(self.method, options)

    def check(self) -> None:
        """The objective's settings, checked together before any file is read."""
        objective, beta = self.objective, self.beta_value
        if self.loss_type is not None and self.loss_type not in LOSS_TYPES_OF.get(objective, ()):
            raise ConfigError(f"kvlab finetune: --loss-type {self.loss_type} is not a loss of --objective {objective}"
                              + (f"; choose one of {', '.join(LOSS_TYPES_OF[objective])}"
                                 if objective in LOSS_TYPES_OF else ""))
        rl = objective in RL_OBJECTIVES
        if self.reward_model and not rl:
            raise ConfigError("kvlab finetune: --reward-model scores RL rollouts; it goes with --objective grpo or "
                              "ppo")
        if objective == "grpo" and self.generations < 2:
            raise ConfigError(f"kvlab finetune: --num-generations {self.generations}: GRPO compares the completions "
                              f"of one prompt, so it needs at least 2")
        if objective == "ppo" and not (self.kl_coef >= 0 and self.vf_coef >= 0):
            raise ConfigError(f"kvlab finetune: --kl-coef {self.kl_coef} and --vf-coef {self.vf_coef} must be >= 0")
        if not (beta > 0 or (objective == "grpo" and beta == 0)) or beta == float("inf"):
            raise ConfigError(f"kvlab finetune: --beta {beta} must be a positive number (dpo: 0.1 is usual; grpo: 0 "
                              f"or e.g. 0.04)")
        if rl and not (0 < self.epsilon < 1 and self.temperature > 0):
            raise ConfigError(f"kvlab finetune: --epsilon {self.epsilon} must be in (0, 1) and --temperature "
                              f"{self.temperature} positive (GRPO samples its groups)")
        if not rl and (self.num_iterations is not None or self.mini_batches != 1):
            raise ConfigError("kvlab finetune: --num-iterations and --mini-batches reuse RL rollouts; they go with "
                              "--objective grpo or ppo")
        rollouts = self.batch_size * self.generations
        if rl and (rollouts % self.mini_batches or (rollouts // self.mini_batches) % self.grad_accum):
            raise ConfigError(f"kvlab finetune: --batch-size {self.batch_size} x --num-generations "
                              f"{self.generations} = {rollouts} rollouts per step do not split into --mini-batches "
                              f"{self.mini_batches} updates of --grad-accum {self.grad_accum} equal micro-batches; "
                              f"change one of them")

    def check_budget(self) -> None:
        """The reward centring and the one budget (checked once the data has been read)."""
        if self.center_rewards is not None and not (0 <= self.center_rewards < float("inf")):
            raise ConfigError(f"kvlab finetune: --center-rewards {self.center_rewards} must be a non-negative number")
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError("kvlab finetune: give one budget, --max-steps N or --epochs E"
                              + (" (not both)" if self.max_steps is not None else ""))
        if self.epochs is not None and not (self.epochs > 0 and self.epochs < float("inf")):
            raise ConfigError(f"kvlab finetune: --epochs {self.epochs} must be a positive number (e.g. 1 or 0.5)")

    def train_config(self, n_rows: int) -> TrainConfig:
        """The loop's settings: adapters only, ``max_steps`` given or from the epochs over ``n_rows``."""
        max_steps = self.max_steps
        if max_steps is None:
            max_steps = max(1, round(self.epochs * n_rows / self.batch_size))
        return TrainConfig(out_dir=self.out, max_steps=max_steps, batch_size=self.batch_size,
                           grad_accum=self.grad_accum, seq_len=self.seq_len, lr=self.lr,
                           warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, eval_every=max_steps,
                           save_every=self.save_every, keep_last=self.keep_last, log_every=self.log_every,
                           seed=self.seed, train_only="adapter")

    def settings(self, spec: AdapterSpec, tcfg: TrainConfig) -> dict:
        """What a resumed run must repeat (kvlab.io.rundir): these keys and values are in every run.json."""
        from kvlab.training.checkpoints import run_settings

        return {"model": self.source.model, "adapter_method": self.method, "options": spec.options,
                "data": self.data, "objective": self.objective, "beta": self.beta_value,
                "loss_type": self.setting("loss_type"), "simpo_gamma": self.simpo_gamma,
                "sft_weight": self.sft_weight, "center_rewards": self.center_rewards,
                "num_generations": self.generations, "max_new_tokens": self.max_new_tokens,
                "kl_coef": self.kl_coef, "vf_coef": self.vf_coef, "num_iterations": self.iterations,
                "mini_batches": self.mini_batches, "temperature": self.temperature, "epsilon": self.epsilon,
                "reward_model": self.reward_model, "eval_data": self.eval_data, "eval_limit": self.eval_limit,
                "pack": self.pack, "merge": self.merge, **run_settings(tcfg)}

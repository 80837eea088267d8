"""What each fine-tuning objective trains on, and the objective itself (:class:`TrainingSetup`):

- ``sft``: chat rows (:class:`~kvlab.data.chat.ChatBatches`), the loss on the assistant's tokens;
- ``reward``: preference pairs and a Bradley-Terry loss on a new score head trained with the
  adapter; ``dpo``: the same pairs and DPO / IPO / SimPO against the adapter-free base;
- ``grpo``/``ppo``: the conversations' prompts, rewarded by exact match with their answers (or a
  reward model); PPO adds a value head (the score head, read per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvlab.data.chat import ChatBatches, read_chat_data, read_chat_jsonl
from kvlab.errors import ConfigError
from kvlab.models.heads import add_score_head
from kvlab.recipes.finetune_config import PREFERENCE_OBJECTIVES, RL_OBJECTIVES, FinetuneConfig


@dataclass
class FinetuneData:
    """The records read for a run: ``train`` (conversations, or preference records for reward and
    DPO) and the held-out ``eval_conversations`` (task accuracy) or ``eval_records`` (reward
    models: pairwise accuracy)."""

    train: list
    eval_conversations: list | None = None
    eval_records: list | None = None


@dataclass
class TrainingSetup:
    """The batches, the objective (None: the loop's cross-entropy, SFT) and held-out preference
    batches (reward models)."""

    batches: Any
    objective: Any = None
    eval_pairs: Any = None


def read_finetune_data(cfg: FinetuneConfig) -> FinetuneData:
    """``cfg.data`` and ``cfg.eval_data`` (at most ``cfg.eval_limit`` held-out records), validated."""
    if cfg.objective not in PREFERENCE_OBJECTIVES:
        return FinetuneData(read_chat_data(cfg.data, seed=cfg.seed),
                            read_chat_jsonl(cfg.eval_data)[:cfg.eval_limit] if cfg.eval_data else None)
    from kvlab.data.preferences import read_preference_jsonl

    data = FinetuneData(read_preference_jsonl(cfg.data))
    if cfg.eval_data and cfg.objective == "reward":
        data.eval_records = read_preference_jsonl(cfg.eval_data)[:cfg.eval_limit]
    elif cfg.eval_data:
        data.eval_conversations = read_chat_jsonl(cfg.eval_data)[:cfg.eval_limit]
    return data


def training_setup(cfg: FinetuneConfig, model, data: FinetuneData) -> TrainingSetup:
    """The batches and the objective of ``cfg.objective`` on ``model`` (which gets a score head
    for a reward model or PPO)."""
    if cfg.objective in PREFERENCE_OBJECTIVES:
        return _preference_setup(cfg, model, data)
    if cfg.objective in RL_OBJECTIVES:
        return _rl_setup(cfg, model, data)
    return TrainingSetup(ChatBatches(data.train, model.tokenizer, cfg.seq_len, cfg.batch_size, pack=cfg.pack,
                                     seed=cfg.seed))


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _preference_setup(cfg: FinetuneConfig, model, data: FinetuneData) -> TrainingSetup:
    from kvlab.data.preferences import PreferenceBatches, encode_preference
    from kvlab.training.preference import DPOLoss, Reference, RewardLoss

    if cfg.pack:
        raise ConfigError("kvlab finetune: --pack is for chat data (sft); preference pairs are one pair per row")
    tok = model.tokenizer
    pad = _pad_id(tok)
    batches = PreferenceBatches([encode_preference(tok, r) for r in data.train], pad, cfg.seq_len, cfg.batch_size,
                                seed=cfg.seed)
    eval_pairs = None
    if data.eval_records:
        eval_pairs = PreferenceBatches([encode_preference(tok, r) for r in data.eval_records], pad, cfg.seq_len,
                                       cfg.batch_size)
    if cfg.objective == "reward":
        add_score_head(model, seed=cfg.seed)
        return TrainingSetup(batches, RewardLoss(center_coefficient=cfg.center_rewards), eval_pairs)
    if not 0 <= cfg.sft_weight < float("inf"):
        raise ConfigError(f"kvlab finetune: --sft-weight {cfg.sft_weight} must be a non-negative number")
    loss_type = cfg.setting("loss_type")
    objective = DPOLoss(None if loss_type == "simpo" else Reference(), beta=cfg.beta_value, loss_type=loss_type,
                        simpo_gamma=cfg.simpo_gamma, sft_weight=cfg.sft_weight)
    return TrainingSetup(batches, objective, eval_pairs)


def _rl_setup(cfg: FinetuneConfig, model, data: FinetuneData) -> TrainingSetup:
    from kvlab.training.preference import Reference
    from kvlab.training.rl import (
        ExactMatchReward,
        GRPOLoss,
        PPOLoss,
        PromptBatches,
        RewardModelReward,
        prompts_from_conversations,
    )

    if cfg.pack:
        raise ConfigError(f"kvlab finetune: --pack is for chat data (sft); {cfg.objective} samples one completion "
                          f"per row")
    tok = model.tokenizer
    prompts, answers = prompts_from_conversations(tok, data.train)
    stop = [t for t in {tok.eos_token_id, model.cfg.eos_token_id} if t is not None]
    pad = _pad_id(tok)
    batches = PromptBatches(prompts, pad, cfg.batch_size, seed=cfg.seed)
    if cfg.reward_model:
        from kvlab.io import load

        reward = RewardModelReward(load(cfg.reward_model, device=cfg.source.device))
    else:
        reward = ExactMatchReward(tok, answers, stop)
    sampling = dict(num_generations=cfg.generations, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    epsilon=cfg.epsilon, num_iterations=cfg.iterations, mini_batches=cfg.mini_batches,
                    stop_tokens=stop, pad_id=pad, seed=cfg.seed)
    if cfg.objective == "grpo":
        beta = cfg.beta_value
        return TrainingSetup(batches, GRPOLoss(reward, beta=beta, reference=Reference() if beta else None,
                                               loss_type=cfg.setting("loss_type"), **sampling))
    add_score_head(model, seed=cfg.seed)            # the value head, trained with the adapter
    return TrainingSetup(batches, PPOLoss(reward, kl_coef=cfg.kl_coef, vf_coef=cfg.vf_coef,
                                          reference=Reference() if cfg.kl_coef else None, **sampling))

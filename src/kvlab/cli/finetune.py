"""``kvlab finetune``: an adapter on chat data (:mod:`kvlab.recipes.finetune`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvlab.cli.common import UsageError, add_overwrite, load_model, model_args, positive_int, seed_arg, torch_seed


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune an adapter (LoRA, QLoRA, AdaLoRA, prefix, P-tuning v2, prompt) "
                                        "on chat data (SFT) or preference pairs (reward model, DPO)",
                       description="Supervised fine-tuning on chat JSONL ({\"messages\": [...]} per line) with the "
                                   "model's chat template and the loss on assistant tokens only. Writes OUT/adapter "
                                   "(kvlab), OUT/peft (HF PEFT, LoRA family), OUT/merged (--merge) and "
                                   "OUT/summary.json; checkpoints for --resume.")
    model_args(p)
    p.add_argument("--method", required=True, choices=["lora", "qlora", "adalora", "prefix", "ptuning", "prompt"])
    p.add_argument("--objective", default="sft", choices=["sft", "reward", "dpo", "grpo", "ppo"],
                   help="sft (chat data, loss on assistant tokens; default), reward (a reward model: a score head "
                        "trained with the adapter on preference pairs, Bradley-Terry), dpo (preference pairs, "
                        "the adapter-free base as reference), grpo (online RL on chat tasks: groups sampled with "
                        "the KV cache, rewarded by exact match with the answer or by --reward-model) or ppo (the "
                        "same rollouts, one per prompt by default, a value head, GAE and a per-token KL penalty)")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="chat JSONL (sft) or preference JSONL in TRL's formats (reward, dpo); kvlab tasks writes both")
    p.add_argument("--eval-data", metavar="FILE", help="held-out chat JSONL (sft, dpo: exact-match accuracy) or "
                                                       "preference JSONL (reward: pairwise accuracy), before and after")
    p.add_argument("--eval-limit", type=int, help="score at most this many held-out conversations")
    p.add_argument("--out", required=True, metavar="DIR")
    budget = p.add_argument_group("budget (give one)")
    budget.add_argument("--max-steps", type=int)
    budget.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256, help="row length; longer conversations are truncated")
    p.add_argument("--pack", action="store_true", help="pack several conversations per row (segment-masked)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add_overwrite(p, run=True)
    p.add_argument("--merge", action="store_true", help="also write OUT/merged: LoRA/AdaLoRA folded into the base")
    lora = p.add_argument_group("LoRA / QLoRA / AdaLoRA")
    lora.add_argument("--r", type=int, default=8, help="rank (AdaLoRA: the target rank)")
    lora.add_argument("--init-r", type=int, default=12, help="AdaLoRA: the initial rank")
    lora.add_argument("--alpha", type=float, default=16.0)
    lora.add_argument("--dropout", type=float, default=0.0)
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    lora.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj",
                      help="comma-separated layer names or regular expressions over full names")
    pref = p.add_argument_group("reward / dpo / grpo")
    pref.add_argument("--beta", type=float, help="dpo: inverse temperature of the preference loss (default 0.1); "
                                                 "grpo: weight of the KL to the adapter-free base (default 0)")
    pref.add_argument("--loss-type", choices=["sigmoid", "ipo", "simpo", "grpo", "dr_grpo"],
                      help="dpo: DPO (sigmoid, default), IPO, or SimPO (reference-free); grpo: grpo (per-completion "
                           "mean, default) or dr_grpo (token sum over completions x max new tokens)")
    pref.add_argument("--num-generations", type=positive_int,
                      help="grpo: completions per prompt (default 8); ppo: (default 1)")
    pref.add_argument("--max-new-tokens", type=positive_int, default=32, help="grpo: longest completion")
    pref.add_argument("--temperature", type=float, default=1.0, help="grpo: sampling temperature of the rollouts")
    pref.add_argument("--epsilon", type=float, default=0.2, help="grpo: clipping range of the ratio")
    pref.add_argument("--num-iterations", type=positive_int,
                      help="grpo/ppo: optimizer passes over each batch of rollouts, reusing them (TRL's "
                           "num_iterations / num_ppo_epochs; default: grpo 1, ppo 4)")
    pref.add_argument("--mini-batches", type=positive_int, default=1,
                      help="grpo/ppo: updates per pass, each on a shuffled part of the rollouts (default 1)")
    pref.add_argument("--kl-coef", type=float, default=0.05, help="ppo: per-token KL penalty to the adapter-free base")
    pref.add_argument("--vf-coef", type=float, default=0.1, help="ppo: weight of the value loss")
    pref.add_argument("--reward-model", metavar="MODEL",
                      help="grpo: score completions with this reward model (a model with a score head, e.g. "
                           "finetune --objective reward --merge's OUT/merged) instead of exact match")
    pref.add_argument("--simpo-gamma", type=float, default=0.5, help="dpo --loss-type simpo: the target margin")
    pref.add_argument("--sft-weight", type=float, default=0.0,
                      help="dpo: add this weight times the chosen answers' NLL per token (RPO; 1.0 is its choice)")
    pref.add_argument("--center-rewards", type=float, help="reward: centring coefficient c · (r+ + r-)^2 (e.g. 0.01)")
    prompt = p.add_argument_group("prefix / P-tuning v2 / prompt tuning")
    prompt.add_argument("--virtual-tokens", type=positive_int, default=16)
    prompt.add_argument("--reparam-hidden", type=int, default=512, help="prefix tuning's MLP width")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.data.chat import ChatBatches, read_chat_jsonl
    from kvlab.io.atomic import refuse_output_over_input
    from kvlab.io.rundir import RunDirectory
    from kvlab.peft import LORA_FAMILY, AdapterSpec
    from kvlab.recipes.finetune import FINETUNE_OUTPUTS, finetune
    from kvlab.training import TrainConfig
    from kvlab.training.checkpoints import RESUMABLE_CHANGES, run_settings

    out = Path(args.out)
    refuse_output_over_input(out, [args.model, args.reward_model])
    refuse_output_over_input(out, [args.data, args.eval_data], what="its data", holds=False)
    if args.method in LORA_FAMILY:
        options = dict(alpha=args.alpha, dropout=args.dropout, target_modules=args.target_modules.split(","))
        if args.method == "adalora":
            options.update(init_r=args.init_r, target_r=args.r)
        else:
            options.update(r=args.r, rslora=args.rslora)
    else:
        options = dict(num_virtual_tokens=args.virtual_tokens)
        if args.method == "prefix":
            options["reparam_hidden"] = args.reparam_hidden
    spec = AdapterSpec(args.method, options)
    losses = {"dpo": ("sigmoid", "ipo", "simpo"), "grpo": ("grpo", "dr_grpo")}
    if args.loss_type is not None and args.loss_type not in losses.get(args.objective, ()):
        raise UsageError(f"kvlab finetune: --loss-type {args.loss_type} is not a loss of --objective {args.objective}"
                         + (f"; choose one of {', '.join(losses[args.objective])}" if args.objective in losses else ""))
    loss_type = args.loss_type or {"dpo": "sigmoid", "grpo": "grpo"}.get(args.objective)
    beta = args.beta if args.beta is not None else {"dpo": 0.1, "grpo": 0.0}.get(args.objective, 0.1)
    rl = args.objective in ("grpo", "ppo")
    if args.reward_model and not rl:
        raise UsageError("kvlab finetune: --reward-model scores RL rollouts; it goes with --objective grpo or ppo")
    generations = args.num_generations or (8 if args.objective == "grpo" else 1)
    if args.objective == "grpo" and generations < 2:
        raise UsageError(f"kvlab finetune: --num-generations {generations}: GRPO compares the completions of one "
                         f"prompt, so it needs at least 2")
    if args.objective == "ppo" and not (args.kl_coef >= 0 and args.vf_coef >= 0):
        raise UsageError(f"kvlab finetune: --kl-coef {args.kl_coef} and --vf-coef {args.vf_coef} must be >= 0")
    if not (beta > 0 or (args.objective == "grpo" and beta == 0)) or beta == float("inf"):
        raise UsageError(f"kvlab finetune: --beta {beta} must be a positive number (dpo: 0.1 is usual; grpo: 0 or "
                         f"e.g. 0.04)")
    if rl and not (0 < args.epsilon < 1 and args.temperature > 0):
        raise UsageError(f"kvlab finetune: --epsilon {args.epsilon} must be in (0, 1) and --temperature "
                         f"{args.temperature} positive (GRPO samples its groups)")
    iterations = args.num_iterations or (4 if args.objective == "ppo" else 1)
    if not rl and (args.num_iterations is not None or args.mini_batches != 1):
        raise UsageError("kvlab finetune: --num-iterations and --mini-batches reuse RL rollouts; they go with "
                         "--objective grpo or ppo")
    rollouts = args.batch_size * generations
    if rl and (rollouts % args.mini_batches or (rollouts // args.mini_batches) % args.grad_accum):
        raise UsageError(f"kvlab finetune: --batch-size {args.batch_size} x --num-generations {generations} = "
                         f"{rollouts} rollouts per step do not split into --mini-batches {args.mini_batches} updates "
                         f"of --grad-accum {args.grad_accum} equal micro-batches; change one of them")
    preferences = args.objective in ("reward", "dpo")
    if preferences:
        from kvlab.data.preferences import read_preference_jsonl

        train_records = read_preference_jsonl(args.data)
        eval_convs = None
        eval_records = None
        if args.eval_data:
            if args.objective == "reward":
                eval_records = read_preference_jsonl(args.eval_data)[:args.eval_limit]
            else:
                eval_convs = read_chat_jsonl(args.eval_data)[:args.eval_limit]
    else:
        train_convs = read_chat_jsonl(args.data)
        eval_convs = read_chat_jsonl(args.eval_data)[:args.eval_limit] if args.eval_data else None
    if args.center_rewards is not None and not (0 <= args.center_rewards < float("inf")):
        raise UsageError(f"kvlab finetune: --center-rewards {args.center_rewards} must be a non-negative number")
    if (args.max_steps is None) == (args.epochs is None):
        raise UsageError("kvlab finetune: give one budget, --max-steps N or --epochs E"
                         + (" (not both)" if args.max_steps is not None else ""))
    if args.epochs is not None and not (args.epochs > 0 and args.epochs < float("inf")):
        raise UsageError(f"kvlab finetune: --epochs {args.epochs} must be a positive number (e.g. 1 or 0.5)")
    model = load_model(args, decoder_only="finetune")
    if args.method not in LORA_FAMILY and args.virtual_tokens >= model.cfg.max_seq_len:
        raise UsageError(f"kvlab finetune: --virtual-tokens {args.virtual_tokens} leaves no room for text in the "
                         f"model's context of {model.cfg.max_seq_len} tokens; use far fewer (e.g. 16-64)")
    if model.tokenizer is None:
        raise UsageError(f"kvlab finetune: {args.model} has no tokenizer to render the chat data with")
    if args.seq_len > model.cfg.max_seq_len:
        raise UsageError(f"kvlab finetune: --seq-len {args.seq_len} exceeds the model's max_seq_len "
                         f"{model.cfg.max_seq_len}; use rows of at most {model.cfg.max_seq_len} tokens")
    objective, eval_pairs = None, None
    if preferences:
        from kvlab.data.preferences import PreferenceBatches, encode_preference
        from kvlab.training.preference import DPOLoss, Reference, RewardLoss

        if args.pack:
            raise UsageError("kvlab finetune: --pack is for chat data (sft); preference pairs are one pair per row")
        tok = model.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batches = PreferenceBatches([encode_preference(tok, r) for r in train_records], pad, args.seq_len,
                                    args.batch_size, seed=args.seed)
        if eval_records:
            eval_pairs = PreferenceBatches([encode_preference(tok, r) for r in eval_records], pad, args.seq_len,
                                           args.batch_size)
        if args.objective == "reward":
            from kvlab.models.heads import add_score_head

            add_score_head(model, seed=args.seed)
            objective = RewardLoss(center_coefficient=args.center_rewards)
        else:
            if not 0 <= args.sft_weight < float("inf"):
                raise UsageError(f"kvlab finetune: --sft-weight {args.sft_weight} must be a non-negative number")
            objective = DPOLoss(None if loss_type == "simpo" else Reference(), beta=beta,
                                loss_type=loss_type, simpo_gamma=args.simpo_gamma, sft_weight=args.sft_weight)
        n_rows = len(batches.rows)
    elif rl:
        from kvlab.training.preference import Reference
        from kvlab.training.rl import (
            ExactMatchReward,
            GRPOLoss,
            PPOLoss,
            PromptBatches,
            RewardModelReward,
            prompts_from_conversations,
        )

        if args.pack:
            raise UsageError(f"kvlab finetune: --pack is for chat data (sft); {args.objective} samples one completion "
                             f"per row")
        tok = model.tokenizer
        prompts, answers = prompts_from_conversations(tok, train_convs)
        stop = [t for t in {tok.eos_token_id, model.cfg.eos_token_id} if t is not None]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batches = PromptBatches(prompts, pad, args.batch_size, seed=args.seed)
        if args.reward_model:
            from kvlab.io import load

            reward = RewardModelReward(load(args.reward_model, device=args.device))
        else:
            reward = ExactMatchReward(tok, answers, stop)
        sampling = dict(num_generations=generations, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        epsilon=args.epsilon, num_iterations=iterations, mini_batches=args.mini_batches,
                        stop_tokens=stop, pad_id=pad, seed=args.seed)
        if args.objective == "grpo":
            objective = GRPOLoss(reward, beta=beta, reference=Reference() if beta else None, loss_type=loss_type,
                                 **sampling)
        else:
            from kvlab.models.heads import add_score_head

            add_score_head(model, seed=args.seed)            # the value head, trained with the adapter
            objective = PPOLoss(reward, kl_coef=args.kl_coef, vf_coef=args.vf_coef,
                                reference=Reference() if args.kl_coef else None, **sampling)
        n_rows = len(batches.rows)
    else:
        batches = ChatBatches(train_convs, model.tokenizer, args.seq_len, args.batch_size, pack=args.pack,
                              seed=args.seed)
        n_rows = len(batches.rows)
    max_steps = args.max_steps
    if max_steps is None:
        max_steps = max(1, round(args.epochs * n_rows / args.batch_size))
    cfg = TrainConfig(out_dir=str(out), max_steps=max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
                      weight_decay=0.0, eval_every=max_steps, save_every=args.save_every, keep_last=args.keep_last,
                      log_every=args.log_every, seed=args.seed, train_only="adapter")
    torch_seed(args.seed)
    settings = {"model": args.model, "adapter_method": args.method, "options": spec.options, "data": args.data,
                "objective": args.objective, "beta": beta, "loss_type": loss_type,
                "simpo_gamma": args.simpo_gamma, "sft_weight": args.sft_weight, "center_rewards": args.center_rewards,
                "num_generations": generations, "max_new_tokens": args.max_new_tokens, "kl_coef": args.kl_coef,
                "vf_coef": args.vf_coef, "num_iterations": iterations, "mini_batches": args.mini_batches,
                "temperature": args.temperature, "epsilon": args.epsilon, "reward_model": args.reward_model,
                "eval_data": args.eval_data, "eval_limit": args.eval_limit, "pack": args.pack, "merge": args.merge,
                **run_settings(cfg)}
    with RunDirectory(out, "finetune", settings, entries=FINETUNE_OUTPUTS, resume=args.resume,
                      overwrite=args.overwrite, free=RESUMABLE_CHANGES,
                      scaffolding=("metrics.jsonl", "checkpoints")):
        summary = finetune(model, model.tokenizer, spec, batches, cfg, eval_conversations=eval_convs,
                           merge=args.merge, resume=args.resume, device=args.device, objective=objective,
                           eval_pairs=eval_pairs)
    keys = ("method", "trainable_parameters", "first_loss", "final_loss", "first_reward", "final_reward",
            "seconds_per_step", "peak_memory_bytes", "base_weight_memory", "adapter", "peft", "merged")
    brief = {k: summary[k] for k in keys if k in summary}
    brief["objective"] = summary["objective"]
    for k in ("accuracy_before", "accuracy_after", "pairwise_accuracy_before", "pairwise_accuracy_after"):
        if k in summary:
            brief[k] = summary[k]["accuracy"]
    print(json.dumps(brief))
    return 0

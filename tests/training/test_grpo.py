"""GRPO: group advantages against their closed form, the per-token loss against a float64 hand
computation, rollouts through kvlab's cached generation, learning a dense reward on a tiny model,
exact resume, and the KL to an adapter's base. (Parity with TRL's GRPO loss: test_trl_parity.py.)"""

import json
import math

import pytest
import torch

from kvlab import ConfigError
from kvlab.data.instruct import make_tasks
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.peft import AdapterSpec, attach
from kvlab.training import TrainConfig, train
from kvlab.training.preference import Reference
from kvlab.training.rl import (
    ExactMatchReward,
    GRPOLoss,
    PromptBatches,
    group_advantages,
    grpo_token_loss,
    prompts_from_conversations,
    reduce_grpo_loss,
)

from conftest import make_model

TOK = ByteTokenizer()
LETTERS = set(TOK.encode("abcdefghijklmnopqrstuvwxyz", add_special_tokens=False))


def test_group_advantages_closed_form_and_equal_rewards_give_zero():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4)
    g = r[:4]
    want = (g - g.mean()) / (((g - g.mean()) ** 2).sum() / 3).sqrt().add(1e-4)
    torch.testing.assert_close(adv[:4], want)
    assert torch.equal(adv[4:], torch.zeros(4))                     # a group with equal rewards learns nothing
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.cat([g - 0.5, torch.zeros(4)]))
    with pytest.raises(ConfigError, match="scale_rewards"):
        group_advantages(r, 4, "median")


def test_the_per_token_loss_is_the_clipped_surrogate_plus_k3():
    g = torch.Generator().manual_seed(0)
    logps, old, ref = (-torch.rand(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    got = grpo_token_loss(logps, old, adv, mask, ref_logps=ref, beta=0.04, epsilon_low=0.2, epsilon_high=0.28)
    for i in range(3):
        for t in range(5):
            ratio = float(torch.exp(logps[i, t] - old[i, t]))
            clipped = min(max(ratio, 0.8), 1.28)
            d = float(ref[i, t] - logps[i, t])
            a = adv[i].item()
            want = (-min(ratio * a, clipped * a) + 0.04 * (math.exp(d) - d - 1)) * mask[i, t].item()
            assert got[i, t].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    with_ratio = grpo_token_loss(logps, old, adv, mask, ref_logps=ref, beta=0.04, kl_ratio=True)
    d = ref - logps
    torch.testing.assert_close(with_ratio - got, 0.04 * (torch.exp(d) - d - 1) * (torch.exp(logps - old) - 1) * mask)
    per_seq = [float(got[i].sum() / mask[i].sum()) for i in range(3)]
    assert reduce_grpo_loss(got, mask, "grpo", 5).item() == pytest.approx(sum(per_seq))
    assert reduce_grpo_loss(got, mask, "dr_grpo", 5).item() == pytest.approx(float(got.sum()) / 5)


def _a_reward(prompt_ids, prompts, completions):
    """Dense and learnable: the share of lower-case letters in the completion (~8 % at random)."""
    return torch.tensor([sum(t in LETTERS for t in c) / max(len(c), 1) for c in completions])


def _prompts(n=8):
    return [TOK.encode(f"say {i}:", add_special_tokens=False) for i in range(n)]


def _cfg(tmp_path, steps, **kw):
    return TrainConfig(out_dir=str(tmp_path), max_steps=steps, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=0,
                       weight_decay=0.0, log_every=1, eval_every=10**6, save_every=kw.pop("save_every", 10**6),
                       seed=0, **kw)


def test_grpo_learns_a_dense_reward_on_a_tiny_model(tmp_path):
    model = make_model(seed=0)
    objective = GRPOLoss(_a_reward, num_generations=4, max_new_tokens=8, temperature=1.0, pad_id=TOK.pad_token_id,
                         seed=0)
    train(model, PromptBatches(_prompts(), TOK.pad_token_id, 4), None, _cfg(tmp_path, 30), quiet=True,
          objective=objective)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "completion_tokens", "rollout_tokens_per_s"} <= set(records[0])
    first = sum(r["reward"] for r in records[:5]) / 5
    last = sum(r["reward"] for r in records[-5:]) / 5
    assert last > first + 0.2, (first, last)


class _StopAt:
    """Training hooks that interrupt the run after optimizer step ``step`` (as Ctrl-C would)."""

    def __init__(self, step):
        self.step = step

    def regularizer(self):
        return 0.0

    def after_step(self, n):
        if n == self.step:
            raise KeyboardInterrupt

    def state_dict(self):
        return None


def _straight_and_resumed(tmp_path, make_objective, steps=4):
    """Metrics of an uninterrupted run, and of the same run interrupted after step 3 (its last
    checkpoint: step 2) and resumed."""
    from kvlab.errors import Interrupted

    def run(out, resume=False, hooks=None):
        train(make_model(seed=0), PromptBatches(_prompts(), TOK.pad_token_id, 4), None,
              _cfg(out, steps, save_every=2), quiet=True, objective=make_objective(), resume=resume, hooks=hooks)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = run(tmp_path / "a")
    with pytest.raises(Interrupted):
        run(tmp_path / "b", hooks=_StopAt(3))
    return straight, run(tmp_path / "b", resume=True)


def test_grpo_resumes_exactly(tmp_path):
    straight, resumed = _straight_and_resumed(tmp_path, lambda: GRPOLoss(
        _a_reward, num_generations=3, max_new_tokens=6, pad_id=TOK.pad_token_id, seed=1))
    assert len(resumed) == 4
    assert [(r["loss"], r["reward"]) for r in resumed] == [(r["loss"], r["reward"]) for r in straight]


def test_rollouts_are_sampled_once_per_step_and_each_pass_reads_every_one_of_them(monkeypatch, tmp_path):
    """num_iterations=2 x mini_batches=2: one generate call per step; each pass's two updates
    read disjoint halves that together are all the step's rollouts; the sampling policy's
    log-probabilities are those of the model that sampled them (ratio 1 at the first update), and
    from the second update on the ratio moves."""
    import kvlab.inference.generation as generation
    from kvlab.training.rl import Rollouts, completion_token_logps

    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_model(seed=0)
    objective = GRPOLoss(_a_reward, num_generations=4, max_new_tokens=6, pad_id=TOK.pad_token_id, seed=0,
                         num_iterations=2, mini_batches=2)
    assert objective.updates_per_batch == 4 and objective.update_rows(4) == 8
    batch = PromptBatches(_prompts(), TOK.pad_token_id, 4).batch(0)
    first = objective.batch_for_update(model, batch, 0)
    buffer = objective._buffer
    assert len(calls) == 1 and buffer.prompt.shape[0] == 16
    with torch.no_grad():
        now = completion_token_logps(model, buffer.prompt, buffer.prompt_mask, buffer.completion,
                                     buffer.completion_mask)
    torch.testing.assert_close(buffer.old_logps, now * buffer.completion_mask)   # as sampled (0 at padding)
    parts = [first] + [objective.batch_for_update(model, batch, u) for u in (1, 2, 3)]
    assert len(calls) == 1

    def rows(r):
        return {tuple(r.prompt[i].tolist()) + tuple(r.completion[i].tolist()) + (float(r.advantages[i]),)
                for i in range(r.prompt.shape[0])}

    everything = rows(buffer)
    for a, b in ((parts[0], parts[1]), (parts[2], parts[3])):
        assert rows(a) | rows(b) == everything and not rows(a) & rows(b)
    assert rows(parts[0]) != rows(parts[2])                       # each pass shuffles anew
    objective.loss(model, first)
    assert objective.pop_metrics()["clip_fraction"] == 0.0
    with torch.no_grad():                                         # the policy moves, as after an update
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loss = objective.loss(model, parts[1])
    assert objective.pop_metrics()["clip_fraction"] > 0
    r = Rollouts(*parts[1])
    logps = completion_token_logps(model, r.prompt, r.prompt_mask, r.completion, r.completion_mask)
    m = r.completion_mask.float()
    want = reduce_grpo_loss(grpo_token_loss(logps, r.old_logps, r.advantages, m), m, "grpo", 6)
    torch.testing.assert_close(loss, want)
    with pytest.raises(ConfigError, match="no rollouts"):
        objective.batch_for_update(model, PromptBatches(_prompts(), TOK.pad_token_id, 4).batch(1), 1)
    with pytest.raises(ConfigError, match="mini_batches=3"):
        train(make_model(), PromptBatches(_prompts(), TOK.pad_token_id, 4), None, _cfg(tmp_path, 1), quiet=True,
              objective=GRPOLoss(_a_reward, num_generations=2, mini_batches=3, pad_id=TOK.pad_token_id))


def test_grpo_reusing_its_rollouts_resumes_exactly(tmp_path):
    straight, resumed = _straight_and_resumed(tmp_path, lambda: GRPOLoss(
        _a_reward, num_generations=2, max_new_tokens=6, pad_id=TOK.pad_token_id, seed=1, num_iterations=2,
        mini_batches=2))
    assert len(resumed) == 4 and resumed[-1]["clip_fraction"] > 0
    assert [(r["loss"], r["reward"], r["clip_fraction"]) for r in resumed] == \
        [(r["loss"], r["reward"], r["clip_fraction"]) for r in straight]


def test_kl_to_an_adapters_base_is_zero_before_the_adapter_moves():
    model = make_model(seed=0)
    attach(model, AdapterSpec("lora", {"r": 4}))
    objective = GRPOLoss(_a_reward, num_generations=2, max_new_tokens=5, beta=0.1, reference=Reference(),
                         pad_id=TOK.pad_token_id)
    batch = PromptBatches(_prompts(2), TOK.pad_token_id, 2).batch(0)
    objective.loss(model, objective.batch_for_update(model, batch, 0))
    assert objective.pop_metrics()["kl"] == 0.0


def test_exact_match_reward_checks_the_builtin_answers():
    conversations = make_tasks(5, seed=2)
    prompts, answers = prompts_from_conversations(TOK, conversations)
    reward = ExactMatchReward(TOK, answers, stop_tokens=[TOK.eos_token_id])
    right = TOK.encode(answers[3], add_special_tokens=False) + [TOK.eos_token_id]
    wrong = TOK.encode(answers[3] + "0", add_special_tokens=False)
    assert reward([3, 3], [prompts[3]] * 2, [right, wrong]).tolist() == [1.0, 0.0]


def test_grpo_options_are_checked():
    with pytest.raises(ConfigError, match="num_generations"):
        GRPOLoss(_a_reward, num_generations=1)
    with pytest.raises(ConfigError, match="reference"):
        GRPOLoss(_a_reward, beta=0.1)
    with pytest.raises(ConfigError, match="loss_type"):
        GRPOLoss(_a_reward, loss_type="ppo")


def test_finetune_cli_runs_grpo_with_exact_match_and_with_a_reward_model(tmp_path, capsys):
    """kvlab finetune --objective grpo on the built-in tasks: exact-match rewards, then the rewards of
    a reward model trained (and merged) by kvlab finetune --objective reward; metrics carry rewards
    and rollout speed, and a resumed run continues exactly."""
    from kvlab.cli import main
    from kvlab.io import save_checkpoint

    model = make_model(seed=0)
    model.tokenizer = TOK
    save_checkpoint(model, tmp_path / "m")
    assert main(["tasks", str(tmp_path / "t"), "--train", "40", "--test", "10"]) == 0
    common = ["--method", "lora", "--batch-size", "4", "--lr", "3e-3", "--seq-len", "96"]
    grpo = ["--objective", "grpo", "--data", str(tmp_path / "t" / "train.jsonl"), "--num-generations", "3",
            "--max-new-tokens", "6", "--max-steps", "4", "--save-every", "2"]
    assert main(["finetune", str(tmp_path / "m"), *grpo, "--out", str(tmp_path / "g"), *common]) == 0
    brief = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert brief["objective"] == "grpo" and brief["final_reward"] == 0.0       # a random model answers nothing
    records = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["rollout_tokens_per_s"] > 0 for r in records)

    assert main(["finetune", str(tmp_path / "m"), "--objective", "reward", "--data",
                 str(tmp_path / "t" / "preferences_train.jsonl"), "--max-steps", "3", "--merge",
                 "--out", str(tmp_path / "rm"), *common]) == 0
    capsys.readouterr()
    # The reward model leaves kvlab as transformers' sequence classifier and scores the same there.
    from transformers import AutoModelForSequenceClassification

    from kvlab.io import load

    assert main(["export", str(tmp_path / "rm" / "merged"), "--format", "hf", "-o", str(tmp_path / "rm-hf")]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm-hf").eval()
    rows = torch.tensor([TOK.encode("3 + 4 = 7", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=rows).logits, load(tmp_path / "rm" / "merged").sequence_scores(rows),
                                   rtol=1e-4, atol=1e-5)
    with_rm = [*grpo, "--reward-model", str(tmp_path / "rm" / "merged"), "--beta", "0.04"]
    assert main(["finetune", str(tmp_path / "m"), *with_rm, "--out", str(tmp_path / "g2"), *common]) == 0
    straight = [json.loads(x) for x in (tmp_path / "g2" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward"] != 0.0 and "kl" in r for r in straight)
    # Killed after step 2's checkpoint (simulated: the same run without its step-4 checkpoint), resumed.
    import shutil

    shutil.copytree(tmp_path / "g2", tmp_path / "g3")
    shutil.rmtree(tmp_path / "g3" / "checkpoints" / "step_0000004")
    assert main(["finetune", str(tmp_path / "m"), *with_rm, "--out", str(tmp_path / "g3"), "--resume", *common]) == 0
    resumed = [json.loads(x) for x in (tmp_path / "g3" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["reward"]) for r in resumed] == [(r["loss"], r["reward"]) for r in straight]


# ------------------------------------------------------------------------------------------ PPO
def test_gae_against_its_definition():
    from kvlab.training.rl import gae

    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(r, v, mask, gamma, lam)
    for i in range(3):
        n = int(mask[i].sum())
        vals = [float(v[i, t]) for t in range(n)] + [0.0]
        deltas = [float(r[i, t]) + gamma * vals[t + 1] - vals[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert adv[i, t].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
            assert ret[i, t].item() == pytest.approx(want + vals[t], rel=1e-12, abs=1e-12)
        assert adv[i, n:].abs().sum() == 0
    # gamma = lam = 1: the advantage is the sum of the rewards still to come minus the value
    adv1, _ = gae(r, v, mask, 1.0, 1.0)
    assert adv1[0, 2].item() == pytest.approx(float(r[0, 2:].sum() - v[0, 2]), rel=1e-12)


def test_ppo_learns_a_dense_reward_and_its_value_head_and_reusing_rollouts_learns_more(tmp_path):
    """PPO on the same 20 batches of rollouts: four passes over each (TRL's default
    num_ppo_epochs) learn far more than one pass, whose ratio is always 1."""
    from kvlab.models.heads import add_score_head
    from kvlab.training.rl import PPOLoss

    def run(out, **kw):
        model = add_score_head(make_model(seed=0), seed=0)
        objective = PPOLoss(_a_reward, num_generations=2, max_new_tokens=8, kl_coef=0.01,
                            reference=Reference(make_model(seed=0)), pad_id=TOK.pad_token_id, seed=0, **kw)
        train(model, PromptBatches(_prompts(), TOK.pad_token_id, 4), None, _cfg(out, 20), quiet=True,
              objective=objective)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert {"reward", "kl", "value_loss", "policy_loss", "clip_fraction"} <= set(records[0])
        first = sum(r["reward"] for r in records[:5]) / 5
        last = sum(r["reward"] for r in records[-5:]) / 5
        return first, last, records

    first, last, records = run(tmp_path / "four")                 # num_iterations=4 by default
    assert last > first + 0.4, (first, last)                      # measured: 0.12 -> 0.92
    assert sum(r["value_loss"] for r in records[-5:]) < sum(r["value_loss"] for r in records[:5])
    assert max(r["clip_fraction"] for r in records) > 0
    one_first, one_last, one = run(tmp_path / "one", num_iterations=1)
    assert all(r["clip_fraction"] == 0 for r in one)
    assert last > one_last + 0.3, (last, one_last)                # measured: 0.92 against 0.18


def test_ppo_needs_a_value_head():
    from kvlab.training.rl import PPOLoss

    objective = PPOLoss(_a_reward, kl_coef=0.0, pad_id=TOK.pad_token_id)
    with pytest.raises(ConfigError, match="value head"):
        objective.batch_for_update(make_model(), PromptBatches(_prompts(2), TOK.pad_token_id, 2).batch(0), 0)
    with pytest.raises(ConfigError, match="reference"):
        PPOLoss(_a_reward, kl_coef=0.1)


def test_finetune_cli_runs_ppo_with_a_value_head(tmp_path, capsys):
    from kvlab.cli import main
    from kvlab.io import save_checkpoint

    model = make_model(seed=0)
    model.tokenizer = TOK
    save_checkpoint(model, tmp_path / "m")
    assert main(["tasks", str(tmp_path / "t"), "--train", "20", "--test", "5"]) == 0
    capsys.readouterr()
    assert main(["finetune", str(tmp_path / "m"), "--objective", "ppo", "--method", "lora", "--data",
                 str(tmp_path / "t" / "train.jsonl"), "--max-new-tokens", "5", "--max-steps", "2", "--batch-size", "4",
                 "--out", str(tmp_path / "p")]) == 0
    brief = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert brief["objective"] == "ppo"
    records = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert all({"value_loss", "kl", "reward", "clip_fraction"} <= set(r) for r in records)
    settings = json.loads((tmp_path / "p" / "run.json").read_text())["settings"]
    assert (settings["num_iterations"], settings["mini_batches"]) == (4, 1)        # TRL's num_ppo_epochs
    assert main(["finetune", str(tmp_path / "m"), "--objective", "grpo", "--num-generations", "1", "--method",
                 "lora", "--data", str(tmp_path / "t" / "train.jsonl"), "--max-steps", "1",
                 "--out", str(tmp_path / "g")]) == 2
    assert "at least 2" in capsys.readouterr().err

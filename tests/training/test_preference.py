"""Reward models and DPO: preference data in TRL's formats, the losses against hand computations in
float64, the reward head under padding, the adapter-disabled reference, and the reference cache.
(Loss parity with TRL itself: test_trl_parity.py.)"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kvlab import ConfigError
from kvlab.data.instruct import make_preference_tasks
from kvlab.data.preferences import (
    PreferenceBatches,
    PreferencePair,
    as_rows,
    collate_pairs,
    encode_preference,
    read_preference_jsonl,
)
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.models.heads import add_score_head
from kvlab.peft import AdapterSpec, attach
from kvlab.training.preference import DPOLoss, Reference, RewardLoss, adapters_disabled, completion_logps

from conftest import make_model

TOK = ByteTokenizer()


def _pairs(n=6, seed=0):
    return [encode_preference(TOK, r) for r in make_preference_tasks(n, seed)]


def test_the_three_trl_formats_tokenize_as_their_definitions():
    std = encode_preference(TOK, {"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    assert std == PreferencePair(tuple(TOK.encode("2+2=", add_special_tokens=False)),
                                 (*TOK.encode("4", add_special_tokens=False), TOK.eos_token_id),
                                 (*TOK.encode("5", add_special_tokens=False), TOK.eos_token_id))
    implicit = encode_preference(TOK, {"chosen": "2+2=4", "rejected": "2+2=5"})
    assert implicit == std
    prompt = [{"role": "user", "content": "hi"}]
    conv = encode_preference(TOK, {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes"}],
                                   "rejected": [{"role": "assistant", "content": "no"}]})
    full = TOK.apply_chat_template([*prompt, {"role": "assistant", "content": "yes"}], add_generation_prompt=False)
    assert conv.prompt == tuple(TOK.apply_chat_template(prompt, add_generation_prompt=True))
    assert conv.prompt + conv.chosen == tuple(full) and conv.chosen[-1] == TOK.eos_token_id
    conv_implicit = encode_preference(TOK, {"chosen": [*prompt, {"role": "assistant", "content": "yes"}],
                                            "rejected": [*prompt, {"role": "assistant", "content": "no"}]})
    assert conv_implicit == conv


def test_bad_preference_records_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"p.jsonl:1 needs \"chosen\" and \"rejected\""):
        read_preference_jsonl(path)
    path.write_text(json.dumps({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}))
    with pytest.raises(ConfigError, match="all be text or all be lists"):
        read_preference_jsonl(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_preference_jsonl(tmp_path / "none.jsonl")


def test_builtin_pairs_choose_the_checkable_answer():
    for record in make_preference_tasks(50, seed=3):
        assert record["chosen"][0]["content"] != record["rejected"][0]["content"]
    from kvlab.data.instruct import make_tasks
    answers = [c[2]["content"] for c in make_tasks(50, 3)]
    assert [r["chosen"][0]["content"] for r in make_preference_tasks(50, 3)] == answers


def test_batches_put_chosen_rows_first_and_mask_only_completions():
    pairs = _pairs(4)
    tokens, attn, comp = (as_rows(t) for t in collate_pairs(pairs, pad_id=0))
    for i, p in enumerate(pairs):
        for row, reply in ((i, p.chosen), (4 + i, p.rejected)):
            n = len(p.prompt) + len(reply)
            assert tokens[row, :n].tolist() == [*p.prompt, *reply] and int(attn[row].sum()) == n
            assert comp[row].nonzero().flatten().tolist() == list(range(len(p.prompt), n))
    batches = PreferenceBatches(pairs, 0, seq_len=64, batch_size=3, seed=1)
    assert torch.equal(batches.batch(5)[0], batches.batch(5)[0]) and batches.batch(0)[3].shape == (3,)
    cut = PreferenceBatches([PreferencePair(tuple(range(1, 20)), (30, 31, 32), (40,))], 0, seq_len=8, batch_size=1)
    assert cut.rows[0] == PreferencePair(tuple(range(15, 20)), (30, 31, 32), (40,)) and cut.stats["truncated"] == 1
    long = PreferenceBatches([PreferencePair((1, 2, 3), tuple(range(30, 40)), (40,))], 0, seq_len=8, batch_size=1)
    assert long.rows[0] == PreferencePair((3,), tuple(range(30, 37)), (40,))      # the prompt's end, then a cut reply


def _logps_by_hand(model, pair: PreferencePair, reply) -> float:
    """Sum of log p(reply token | everything before) in float64, one token at a time."""
    seq = [*pair.prompt, *reply]
    logits = model.double()(torch.tensor([seq]))[0].double()
    with torch.no_grad():
        return sum(float(torch.log_softmax(logits[t - 1], -1)[seq[t]]) for t in range(len(pair.prompt), len(seq)))


def test_dpo_ipo_and_simpo_losses_equal_hand_computations():
    policy, ref = make_model(seed=1).double(), make_model(seed=2).double()
    pairs = _pairs(3)
    tokens, attn, comp = collate_pairs(pairs, pad_id=TOK.eos_token_id)
    pi = [(_logps_by_hand(policy, p, p.chosen), _logps_by_hand(policy, p, p.rejected)) for p in pairs]
    rho = [(_logps_by_hand(ref, p, p.chosen), _logps_by_hand(ref, p, p.rejected)) for p in pairs]
    beta = 0.3
    want = sum(-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d))))) for (a, b), (c, d) in zip(pi, rho))
    got = DPOLoss(Reference(ref), beta=beta).loss(policy, (tokens, attn, comp))
    assert got.item() == pytest.approx(want, rel=1e-9)
    lens = [(len(p.chosen), len(p.rejected)) for p in pairs]
    ipo = sum((((a - c) / m) - ((b - d) / k) - 1 / (2 * beta)) ** 2 for (a, b), (c, d), (m, k) in zip(pi, rho, lens))
    assert DPOLoss(Reference(ref), beta=beta, loss_type="ipo").loss(policy, (tokens, attn, comp)).item() == \
        pytest.approx(ipo, rel=1e-9)
    rpo = want - 0.7 * sum(a for a, _ in pi) / sum(m for m, _ in lens) * len(pairs)    # + w · NLL(chosen)/token
    assert DPOLoss(Reference(ref), beta=beta, sft_weight=0.7).loss(policy, (tokens, attn, comp)).item() == \
        pytest.approx(rpo, rel=1e-9)
    simpo = sum(-math.log(1 / (1 + math.exp(-(beta * (a / m - b / k) - 0.5)))) for (a, b), (m, k) in zip(pi, lens))
    assert DPOLoss(beta=beta, loss_type="simpo").loss(policy, (tokens, attn, comp)).item() == \
        pytest.approx(simpo, rel=1e-9)


def test_dpo_gradient_vanishes_as_beta_goes_to_zero():
    policy, ref = make_model(seed=1), make_model(seed=2)
    batch = collate_pairs(_pairs(3), pad_id=TOK.eos_token_id)
    norms = []
    for beta in (1e-2, 1e-4, 1e-6):
        policy.zero_grad()
        DPOLoss(Reference(ref), beta=beta).loss(policy, batch).backward()
        norms.append(math.sqrt(sum(float(p.grad.square().sum()) for p in policy.parameters() if p.grad is not None)))
    # d/dθ −log σ(βh) = −β σ(−βh) ∇h: linear in β as β → 0.
    assert norms[1] == pytest.approx(norms[0] / 100, rel=2e-2) and norms[2] == pytest.approx(norms[0] / 1e4, rel=2e-2)


def test_the_reward_head_reads_the_last_real_token_under_any_padding():
    model = add_score_head(make_model(), seed=0)
    rows = [[5, 6, 7, 8], [9, 10]]
    alone = [float(model.sequence_scores(torch.tensor([r]))[0, 0]) for r in rows]
    right = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    left = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    for tokens, mask in ((right, right != 0), (left, left != 0)):
        got = model.sequence_scores(tokens, attention_mask=mask.long())[:, 0]
        torch.testing.assert_close(got, torch.tensor(alone), rtol=1e-5, atol=1e-5)


def test_reward_loss_is_bradley_terry_with_centring():
    model = add_score_head(make_model(), seed=0)
    batch = collate_pairs(_pairs(4), pad_id=TOK.eos_token_id)
    r = model.sequence_scores(as_rows(batch[0]), attention_mask=as_rows(batch[1]))[:, 0].double()
    c, j = r[:4], r[4:]
    want = float((-F.logsigmoid(c - j) + 0.01 * (c + j) ** 2).sum())
    assert RewardLoss(center_coefficient=0.01).loss(model, batch).item() == pytest.approx(want, rel=1e-6)


def test_an_adapter_disabled_reference_equals_the_separately_loaded_base():
    base = make_model(seed=4)
    policy = make_model(seed=4)
    attach(policy, AdapterSpec("lora", {"r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]}))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)                     # a trained adapter: the policy differs from its base
    batch = [as_rows(t) for t in collate_pairs(_pairs(3), pad_id=TOK.eos_token_id)]
    with torch.no_grad():
        want, _ = completion_logps(base, *batch)
        moved, _ = completion_logps(policy, *batch)
    assert (moved - want).abs().max() > 1e-3
    torch.testing.assert_close(Reference(cache=False).logps(policy, *batch), want, rtol=1e-6, atol=1e-6)
    with adapters_disabled(policy):
        pass
    torch.testing.assert_close(completion_logps(policy, *batch)[0].detach(), moved)      # switched back on


def test_reference_log_probabilities_are_computed_once_per_pair():
    ref = make_model(seed=2)
    calls = []
    ref.register_forward_hook(lambda *a: calls.append(1))
    batches = PreferenceBatches(_pairs(4), TOK.eos_token_id, seq_len=64, batch_size=4)
    reference = Reference(ref)
    def rows(batch):
        return (*(as_rows(t) for t in batch[:3]), batch[3])

    first = reference.logps(None, *rows(batches.batch(0)))
    again = reference.logps(None, *rows(batches.batch(1)))    # the same four pairs, another order
    assert len(calls) == 1
    order = {int(i): k for k, i in enumerate(batches.batch(0)[3])}
    idx = [order[int(i)] for i in batches.batch(1)[3]]
    torch.testing.assert_close(again, torch.cat([first[:4][idx], first[4:][idx]]))


def test_finetune_cli_trains_a_reward_model_and_dpo_on_the_builtin_pairs(tmp_path, capsys):
    """kvlab tasks -> kvlab finetune --objective reward (pairwise accuracy before/after, the head saved
    with the adapter and loaded back) and --objective dpo (the adapter-free base as reference)."""
    from kvlab.cli import main
    from kvlab.io import load, save_checkpoint
    from kvlab.peft import load_adapter
    from kvlab.training.preference import pairwise_accuracy

    model = make_model(seed=0)
    model.tokenizer = TOK
    save_checkpoint(model, tmp_path / "m")
    assert main(["tasks", str(tmp_path / "t"), "--train", "60", "--test", "20"]) == 0
    capsys.readouterr()
    common = ["--method", "lora", "--max-steps", "12", "--batch-size", "8", "--lr", "3e-3", "--seq-len", "96",
              "--target-modules", "q_proj,v_proj,up_proj"]
    assert main(["finetune", str(tmp_path / "m"), "--objective", "reward", "--data",
                 str(tmp_path / "t" / "preferences_train.jsonl"), "--eval-data",
                 str(tmp_path / "t" / "preferences_test.jsonl"), "--out", str(tmp_path / "rm"), *common]) == 0
    brief = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert brief["objective"] == "reward" and brief["final_loss"] < brief["first_loss"]
    assert brief["pairwise_accuracy_after"] > brief["pairwise_accuracy_before"]
    # The adapter carries the head: loaded onto the plain base it scores as at the end of training.
    base = load(tmp_path / "m")
    load_adapter(base, tmp_path / "rm" / "adapter")
    pairs = PreferenceBatches([encode_preference(TOK, r) for r in read_preference_jsonl(
        tmp_path / "t" / "preferences_test.jsonl")], TOK.pad_token_id, 96, 8)
    assert pairwise_accuracy(base, pairs.all_batches())["accuracy"] == pytest.approx(
        brief["pairwise_accuracy_after"])
    assert main(["finetune", str(tmp_path / "m"), "--objective", "dpo", "--data",
                 str(tmp_path / "t" / "preferences_train.jsonl"), "--out", str(tmp_path / "dpo"), *common]) == 0
    brief = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert brief["objective"] == "dpo" and abs(brief["first_loss"] - math.log(2)) < 1e-6    # policy == reference
    assert brief["final_loss"] < brief["first_loss"]

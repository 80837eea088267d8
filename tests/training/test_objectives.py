"""Objectives plug into the one loop: cross-entropy against its closed form, and an objective
written here (distillation to a frozen teacher) trained by the same loop, with resume."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvlab.data.windows import Windows
from kvlab.training import IGNORE_INDEX, CrossEntropy, Objective, TrainConfig, evaluate_loss, train

from conftest import make_model

TOKENS = np.random.default_rng(1).integers(0, 256, 8_000).astype(np.uint16)


def test_cross_entropy_is_the_summed_token_loss_and_counts_targets():
    model = make_model()
    x = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, 1)
    y[0, :4] = IGNORE_INDEX
    obj = CrossEntropy()
    logits = model(x).double()
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(obj.loss(model, (x, y)).double(), expected, rtol=1e-6, atol=1e-6)
    assert obj.count((x, y)) == 30 - 4


class Distill(Objective):
    """KL(teacher || student) per token, summed; the teacher is frozen and brought by the objective."""

    name = "kd"

    def __init__(self, teacher):
        self.teacher = teacher

    def frozen_models(self):
        return [self.teacher]

    def loss(self, model, batch):
        x = batch[0]
        with torch.no_grad():
            target = F.log_softmax(self.teacher(x).float(), -1)
        logp = F.log_softmax(model(x).float(), -1)
        return F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="sum")

    def count(self, batch):
        return batch[0].numel()


def test_an_objective_with_a_frozen_teacher_trains_in_the_loop_and_resumes_exactly(tmp_path):
    teacher = make_model(seed=1, n_kv_head=4)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    windows = Windows(TOKENS, 32, 4, seed=0)
    val = Windows(TOKENS[:2000], 32, 4, mode="sequential")

    def run(out, steps, resume=False):
        cfg = TrainConfig(out_dir=str(out), max_steps=steps, batch_size=4, grad_accum=2, seq_len=32, lr=3e-3,
                          warmup_steps=2, eval_every=100, eval_batches=4, save_every=4, log_every=100)
        student = make_model(seed=2, n_kv_head=1)      # an MQA student of an MHA teacher
        return student, train(student, windows, val, cfg, objective=Distill(teacher), quiet=True, resume=resume)

    before = evaluate_loss(make_model(seed=2, n_kv_head=1), val, 4, "cpu", objective=Distill(teacher))
    student, summary = run(tmp_path / "a", 12)
    after = evaluate_loss(student, val, 4, "cpu", objective=Distill(teacher))
    assert after < 0.7 * before
    assert summary["val_loss"] == after
    for k, v in teacher.state_dict().items():               # the teacher is never trained
        assert torch.equal(v, teacher_state[k])
    assert not any(p.requires_grad for p in teacher.parameters())

    import shutil

    from kvlab.training import checkpoint_dirs

    run(tmp_path / "b", 12)                                 # as if killed after step 8's checkpoint:
    shutil.rmtree(checkpoint_dirs(tmp_path / "b")[-1])      # drop step 12, then resume from step 8
    assert checkpoint_dirs(tmp_path / "b")[-1].name.endswith("8")
    resumed, summary = run(tmp_path / "b", 12, resume=True)
    assert summary["start_step"] == 8
    for (k, v), w in zip(student.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def _kd_closed_form(s, t, T, top_k=None):
    """Per position, in float64 with numpy: T² Σ_i p_i (log p_i − log q_i) over the teacher's
    (top-k, renormalized) support, q = softmax(s/T) over the whole vocabulary."""
    s, t = np.asarray(s, dtype=np.float64) / T, np.asarray(t, dtype=np.float64) / T
    log_q = s - np.log(np.exp(s).sum())
    support = np.argsort(-t)[:top_k] if top_k else np.arange(len(t))
    p = np.exp(t[support]) / np.exp(t[support]).sum()
    return T * T * float((p * (np.log(p) - log_q[support])).sum())


class _Fixed(torch.nn.Module):
    """A 'model' that returns fixed logits (B, T, V), so the loss can be checked by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, x, **kwargs):
        return self.logits


def test_distillation_loss_matches_its_closed_form():
    from kvlab.training import Distillation

    student = [[[1.0, 0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 3.0, -2.0, 1.0], [0.3, 0.2, 0.1, 0.0, -0.1]]]
    teacher = [[[2.0, 0.0, -0.5, 1.0, 0.5], [1.0, -1.0, 2.0, 0.0, 0.0], [0.0, 4.0, 0.0, 1.0, 0.0]]]
    x = torch.zeros(1, 3, dtype=torch.long)
    y = torch.tensor([[1, IGNORE_INDEX, 3]])                   # position 1 carries no loss
    for T, k in ((1.0, None), (2.0, None), (1.5, 2)):
        obj = Distillation(_Fixed(teacher), temperature=T, top_k=k)
        got = obj.loss(_Fixed(student), (x, y)).detach().item()
        want = sum(_kd_closed_form(student[0][i], teacher[0][i], T, k) for i in (0, 2))
        assert got == pytest.approx(want, rel=1e-5), (T, k)
        assert obj.count((x, y)) == 2
    # a mixture with the LM loss: (1 - w)·KD + w·CE
    obj = Distillation(_Fixed(teacher), lm_weight=0.25)
    ce = -sum(np.log(np.exp(student[0][i][y[0, i]]) / np.exp(student[0][i]).sum()) for i in (0, 2))
    kd = sum(_kd_closed_form(student[0][i], teacher[0][i], 1.0) for i in (0, 2))
    assert obj.loss(_Fixed(student), (x, y)).detach().item() == pytest.approx(0.75 * kd + 0.25 * ce, rel=1e-5)
    # identical logits: nothing to learn
    assert Distillation(_Fixed(student)).loss(_Fixed(student), (x, y)).detach().item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("kwargs, match", [(dict(temperature=0), "temperature=0"), (dict(top_k=0), "top_k=0"),
                                           (dict(lm_weight=2), "lm_weight=2")])
def test_distillation_options_are_checked(kwargs, match):
    from kvlab import ConfigError
    from kvlab.training import Distillation

    with pytest.raises(ConfigError, match=match):
        Distillation(make_model(), **kwargs)


def test_attention_on_the_models_own_inputs_reproduces_its_attention_outputs():
    from kvlab.training import AttentionTransfer

    model = make_model(n_kv_head=2, cla=2, qkv_bias=True)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    obj = AttentionTransfer(model)
    inputs, outputs = obj.teacher_attention(x)
    for got, want in zip(model.attention_on(x, inputs), outputs):
        torch.testing.assert_close(got, want)
    assert obj.layer_errors(model, x) == pytest.approx([0.0] * 4, abs=1e-6)


@pytest.mark.parametrize("change", [dict(n_kv_head=1), dict(n_kv_head=2, cla=2)])
def test_attention_transfer_lowers_every_layers_output_error(tmp_path, change):
    from kvlab.convert.heads import convert
    from kvlab.training import AttentionTransfer

    teacher = make_model(seed=3, n_kv_head=4)
    student = convert(teacher, method="mean", **change)
    obj = AttentionTransfer(teacher)
    held_out = torch.from_numpy(TOKENS[-600:].astype(np.int64)).view(4, 150)
    before = obj.layer_errors(student, held_out)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if ".self_attn." not in k}
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=60, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2,
                      eval_every=100, save_every=100, log_every=100, train_only="attention")
    train(student, Windows(TOKENS[:-600], 64, 4, seed=1), None, cfg, objective=obj, quiet=True)
    after = obj.layer_errors(student, held_out)
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)
    for k, v in frozen.items():                               # only attention was trained
        assert torch.equal(student.state_dict()[k], v), k

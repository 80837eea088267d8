"""Objectives plug into the one loop: cross-entropy against its closed form, and an objective
written here (distillation to a frozen teacher) trained by the same loop, with resume."""

import numpy as np
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

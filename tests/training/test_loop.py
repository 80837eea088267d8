import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from kvlab import ConfigError
from kvlab.data.windows import Windows
from kvlab.training import (
    CrossEntropy,
    TrainConfig,
    TrainingError,
    checkpoint_dirs,
    lr_at,
    steps_for_budget,
    train,
    trainable_parameters,
)

from conftest import make_model

TOKENS = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(out_dir="x", max_steps=110, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_budget_from_alpha():
    assert steps_for_budget(1000, alpha=0.05, reference_tokens=2_000_000) == 100
    assert steps_for_budget(1000, tokens=1500) == 2
    with pytest.raises(ConfigError, match="--alpha needs --reference-tokens"):
        steps_for_budget(1000, alpha=0.1)


def test_train_only_kv_updates_only_kv_projections(tmp_path):
    model = make_model(n_kv_head=1, cla=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=3, seq_len=32, batch_size=4, train_only="kv", warmup_steps=1)
    train(model, Windows(TOKENS, 32, 4), None, cfg, quiet=True)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
                       "layers.2.self_attn.k_proj.weight", "layers.2.self_attn.v_proj.weight"}
    assert [n for n, _ in trainable_parameters(model, "attention")][0].startswith("layers.0.self_attn")


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 200, dtype=np.uint8).astype(np.uint16)
    model = make_model()
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=40, seq_len=32, batch_size=8, lr=3e-3, warmup_steps=5,
                      eval_every=20, save_every=20)
    train(model, Windows(text, 32, 8), Windows(text, 32, 8, mode="sequential"), cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[-1]["loss"] < rows[0]["loss"] / 2
    assert "val_loss" in rows[19] and "val_loss" in rows[39] and rows[39]["val_loss"] < rows[19]["val_loss"]
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_0000020", "step_0000040"]


def _run(out, *extra):
    return [sys.executable, "-m", "kvlab", "train", "--preset", "tiny", "--out", str(out), "--max-steps", "60",
            "--seq-len", "64", "--batch-size", "16", "--save-every", "7", "--eval-every", "1000",
            "--log-every", "1", "--cache-dir", str(out.parent / "cache"), *extra]


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # same threads in every run: bitwise-equal arithmetic
    subprocess.run(_run(tmp_path / "full"), check=True, capture_output=True, env=env)
    full = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    proc = subprocess.Popen(_run(tmp_path / "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:           # kill mid-run, between two checkpoints
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 24:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(metrics.read_text().splitlines())
    assert done < 60
    subprocess.run(_run(tmp_path / "cut", "--resume"), check=True, capture_output=True, env=env)
    resumed = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(resumed) == 60
    assert resumed == full                  # exactly, step by step


def test_half_written_checkpoints_are_never_picked_up(tmp_path):
    model = make_model()
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=10, seq_len=16, batch_size=2, save_every=5, keep_last=5)
    train(model, Windows(TOKENS, 16, 2), None, cfg, quiet=True)
    root = tmp_path / "checkpoints"
    (root / ".step_0000015.tmp-123").mkdir()                     # an interrupted atomic write
    (root / ".step_0000015.tmp-123" / "model.safetensors").write_bytes(b"partial")
    (root / "step_0000020").mkdir()                              # a copied directory missing its state
    (root / "step_0000020" / "model.safetensors").write_bytes(b"partial")
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_0000005", "step_0000010"]
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=12, seq_len=16, batch_size=2, save_every=5, keep_last=5)
    summary = train(make_model(), Windows(TOKENS, 16, 2), None, cfg, resume=True, quiet=True)
    assert summary["start_step"] == 10 and summary["step"] == 12


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    class PoisonedAfterFourSteps(CrossEntropy):
        calls = 0

        def loss(self, model, batch):
            self.calls += 1
            return super().loss(model, batch) * (float("nan") if self.calls > 4 else 1.0)

    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=8, seq_len=16, batch_size=2, save_every=2)
    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*last good checkpoint is .*step_0000004"):
        train(make_model(), Windows(TOKENS, 16, 2), None, cfg, quiet=True, objective=PoisonedAfterFourSteps())
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_0000002", "step_0000004"]
    metrics = tmp_path / "metrics.jsonl"           # nothing non-finite was ever logged
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    assert all(math.isfinite(json.loads(line)["loss"]) for line in lines)


def test_several_updates_per_batch_equal_a_run_over_their_batches(tmp_path):
    """An objective with ``updates_per_batch = 2`` (each update on one half of the step's batch, as
    RL reusing its rollouts does) makes the optimizer updates of a plain run whose batches are
    those halves, one per step (a constant learning rate: the schedule counts steps)."""

    class Halves(CrossEntropy):
        updates_per_batch = 2

        def update_rows(self, rows):
            return rows // 2

        def batch_for_update(self, model, batch, update):
            return tuple(t[update * 2:(update + 1) * 2] for t in batch)

    class HalfWindows:
        def __init__(self, windows):
            self.windows = windows

        def batch(self, i):
            return tuple(t[(i % 2) * 2:(i % 2 + 1) * 2] for t in self.windows.batch(i // 2))

    def run(out, objective, windows, steps, batch_size):
        torch.manual_seed(0)
        model = make_model()
        cfg = TrainConfig(out_dir=str(out), max_steps=steps, seq_len=16, batch_size=batch_size, lr=3e-3,
                          warmup_steps=0, min_lr_ratio=1.0, grad_clip=1e9, log_every=1, eval_every=10**6)
        train(model, windows, None, cfg, quiet=True, objective=objective)
        return model, [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    windows = Windows(TOKENS, 16, 4)
    a, losses_a = run(tmp_path / "a", Halves(), windows, 3, 4)
    b, losses_b = run(tmp_path / "b", CrossEntropy(), HalfWindows(windows), 6, 2)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    assert losses_a == pytest.approx([(losses_b[i] + losses_b[i + 1]) / 2 for i in (0, 2, 4)], rel=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, strategy):
    """gloo on the CPU; the same global batch split over 2 ranks gives the same losses."""
    common = ["--preset", "tiny", "--max-steps", "4", "--seq-len", "32", "--batch-size", "8", "--save-every", "2",
              "--eval-every", "2", "--eval-batches", "2", "--log-every", "1", "--warmup-steps", "2",
              "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "kvlab", "train", *common, "--out", str(tmp_path / "one")],
                   check=True, capture_output=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=localhost:0", "-m", "kvlab", "train", *common, "--strategy", strategy,
                    "--out", str(tmp_path / "two")], check=True, capture_output=True, env=env, timeout=300)
    one, two = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-4
    # Rank 0 wrote the gathered (unsharded) checkpoint: it loads as a plain model.
    from kvlab import load

    assert load(tmp_path / "two" / "final").cfg.n_kv_head == 2


class _StopAfter:
    """Hooks asking the loop to stop after step ``n`` (a spent wall-time budget, made deterministic)."""

    def __init__(self, n: int):
        self.n, self.step = n, 0

    def regularizer(self):
        return 0.0

    def after_step(self, step: int) -> None:
        self.step = step

    def stop_requested(self) -> bool:
        return self.step >= self.n

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_a_stop_request_checkpoints_that_step_and_a_resume_finishes_like_an_uninterrupted_run(tmp_path):
    cfg = dict(max_steps=8, seq_len=32, batch_size=4, lr=1e-3, warmup_steps=1, save_every=100)
    full = make_model()
    train(full, Windows(TOKENS, 32, 4), None, TrainConfig(out_dir=str(tmp_path / "full"), **cfg), quiet=True)
    model = make_model()
    summary = train(model, Windows(TOKENS, 32, 4), None, TrainConfig(out_dir=str(tmp_path / "cut"), **cfg),
                    quiet=True, hooks=_StopAfter(3))
    assert summary["step"] == 3 and [d.name for d in checkpoint_dirs(tmp_path / "cut")] == ["step_0000003"]
    train(model, Windows(TOKENS, 32, 4), None, TrainConfig(out_dir=str(tmp_path / "cut"), **cfg), quiet=True,
          resume=True)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)

"""Runs that are killed, interrupted, damaged, doubled or re-pointed: what kvlab does then.

Kills mid-save and mid-pruning (the process dies inside the write), SIGINT, two runs on one
directory, a stale lock, a damaged newest checkpoint, a torn metrics line, a resume with other
settings, ``--overwrite`` on a run directory, a closed stdout, and the umask of every output.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvlab.cli import main
from kvlab.io import save_checkpoint
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.training import checkpoint_dirs

from conftest import make_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # the same arithmetic in every run, and no oversubscription


def _train(out: Path, *extra: str, steps: int = 12) -> list[str]:
    return ["train", "--preset", "tiny", "--out", str(out), "--max-steps", str(steps), "--seq-len", "32",
            "--batch-size", "4", "--save-every", "4", "--eval-every", "1000", "--log-every", "1", "--warmup-steps", "2",
            "--cache-dir", str(out.parent / "cache"), *extra]


def _kvlab(args: list[str], prelude: str = "", **kw) -> subprocess.CompletedProcess:
    """``kvlab ARGS`` in a child process, after ``prelude`` (Python that patches something)."""
    code = f"import os, sys\n{prelude}\nfrom kvlab.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV,
                          timeout=300, **kw)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("step_"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> list[float]:
    """The uninterrupted run's losses, step by step."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert _kvlab(_train(out)).returncode == 0
    return _losses(out)


# A kill inside a checkpoint write: the weights are on disk, the process dies before the rename.
DIE_IN_SECOND_SAVE = """
import kvlab.io.kvlab_format as fmt
real, calls = fmt.save_file, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    real(*args, **kwargs)
    if calls[0] == 2:
        os._exit(9)
fmt.save_file = dying
"""
# A kill inside pruning the oldest checkpoint (keep-last 1): one file deleted, then death.
DIE_WHILE_PRUNING = """
import kvlab.training.checkpoints as ck
def dying(path, ignore_errors=False):
    os.remove(next(p for p in __import__("pathlib").Path(path).iterdir() if p.is_file()))
    os._exit(9)
ck.shutil.rmtree = dying
"""


def test_a_kill_during_a_save_resumes_exactly_and_leaves_nothing_behind(tmp_path, full_run):
    out = tmp_path / "run"
    killed = _kvlab(_train(out), DIE_IN_SECOND_SAVE)
    assert killed.returncode == 9
    assert [d.name for d in checkpoint_dirs(out)] == ["step_0000004"]
    assert [n for n in _leftovers(out) if n.startswith(".step_0000008.tmp-")]    # the interrupted write
    resumed = _kvlab(_train(out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert _leftovers(out) == [] and _losses(out) == full_run


def test_a_kill_during_pruning_resumes_exactly_and_leaves_nothing_behind(tmp_path, full_run):
    out = tmp_path / "run"
    killed = _kvlab(_train(out, "--keep-last", "1"), DIE_WHILE_PRUNING)
    assert killed.returncode == 9
    # Pruning renames first: no half-deleted step_N, only a dot-named remainder.
    assert [d.name for d in checkpoint_dirs(out)] == ["step_0000008"]
    assert [n for n in _leftovers(out) if n.startswith(".step_0000004.discard-")]
    resumed = _kvlab(_train(out, "--keep-last", "1", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert _leftovers(out) == [] and _losses(out) == full_run
    assert [d.name for d in checkpoint_dirs(out)] == ["step_0000012"]


def test_resume_falls_back_past_a_damaged_checkpoint_and_a_torn_metrics_line(tmp_path, full_run):
    out = tmp_path / "run"
    assert _kvlab(_train(out, steps=12)).returncode == 0
    newest = checkpoint_dirs(out)[-1]
    state = newest / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])                      # truncated by a crash
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 0.')                           # a torn last line
    # Resume the finished run for 4 more steps: from step 8, since step 12 is damaged.
    resumed = _kvlab(_train(out, "--resume", steps=16))
    assert resumed.returncode == 0, resumed.stderr
    assert "step_0000012 is damaged" in resumed.stderr and "falling back to step_0000008" in resumed.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert [r["loss"] for r in rows[:8]] == full_run[:8]
    assert "Traceback" not in resumed.stderr


def test_two_runs_on_one_directory_the_second_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "kvlab", *_train(out, steps=100000)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / ".kvlab-lock").is_file() and (out / "metrics.jsonl").is_file()):
            assert time.time() < deadline and first.poll() is None, "the first run did not start"
            time.sleep(0.05)
        for extra in ((), ("--resume",), ("--overwrite",)):
            second = _kvlab(_train(out, *extra, steps=100000))
            assert second.returncode == 1, second.stderr
            assert f"in use by another kvlab train run (PID {first.pid}" in second.stderr
            assert "Traceback" not in second.stderr
        while not checkpoint_dirs(out):
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / ".kvlab-lock").is_file()                  # killed: the lock stays, stale
    # The run may end where its last checkpoint is (a shorter --max-steps is allowed on resume).
    take_over = _kvlab(_train(out, "--resume", steps=4))
    assert take_over.returncode == 0, take_over.stderr
    assert f"taking over the lock of a train run that ended without releasing it (PID {first.pid})" in take_over.stderr
    assert not (out / ".kvlab-lock").exists()              # released on the way out


# A real SIGINT, delivered to the process by itself right after its second checkpoint (step 4),
# so the test never depends on how fast the machine is.
SIGINT_AFTER_SECOND_SAVE = """
import signal
# A signal mask is inherited across exec: if the test process happens to have SIGINT blocked (a
# library spawning a helper blocks it around the spawn), the child would never receive it. A
# user's shell never blocks it; make the child's state that one.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
import kvlab.training.loop as loop
real, calls = loop.save_training_checkpoint, [0]
def saving(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return out
loop.save_training_checkpoint = saving
"""


def test_ctrl_c_says_where_it_stopped_and_resume_continues(tmp_path, full_run):
    out = tmp_path / "run"
    stopped = _kvlab(_train(out, "--save-every", "2"), SIGINT_AFTER_SECOND_SAVE)
    assert stopped.returncode == 130, stopped.stderr
    err = stopped.stderr
    assert "interrupted after step 4 of 12; the last checkpoint is step_0000004" in err
    assert "--resume continues from it" in err and "Traceback" not in err
    assert not (out / ".kvlab-lock").exists()
    resumed = _kvlab(_train(out, "--save-every", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(out) == full_run


def test_resume_with_other_settings_is_refused_naming_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(out, steps=4)) == 0
    capsys.readouterr()
    assert main(_train(out, "--resume", "--grad-accum", "2", "--seed", "3", steps=4)) == 2
    err = capsys.readouterr().err
    assert "grad_accum 1 -> 2" in err and "seed 0 -> 3" in err and len(err.strip().splitlines()) == 1
    # Logging and saving settings, and the length, may change.
    assert main(_train(out, "--resume", "--log-every", "3", "--save-every", "2", steps=6)) == 0


def test_a_fresh_run_into_a_run_directory_needs_overwrite_which_keeps_the_users_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(out, steps=4)) == 0
    (out / "my-notes.txt").write_text("mine")
    assert main(_train(out, steps=4)) == 2
    assert "holds a kvlab train run: --resume continues it, --overwrite starts over" in capsys.readouterr().err
    assert main(_train(out, "--overwrite", "--seed", "1", steps=2)) == 0
    assert (out / "my-notes.txt").read_text() == "mine"
    assert [d.name for d in checkpoint_dirs(out)] == ["step_0000002"]          # the old run's are gone
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 1


def test_overwrite_replaces_only_kvlab_outputs_never_a_users_file_or_directory(tmp_path, capsys):
    model = make_model()
    model.tokenizer = ByteTokenizer()
    save_checkpoint(model, tmp_path / "m")
    target = tmp_path / "export"
    target.write_text("a file of mine")
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(tmp_path / "m"), "-o", str(target), *extra]) == 2
        assert "never replaces a user's file" in capsys.readouterr().err
        assert target.read_text() == "a file of mine"
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.txt").write_text("years of work")
    (home / ".bashrc").write_text("alias")
    for argv in (["tasks", str(home)], ["convert", str(tmp_path / "m"), "--mqa", "-o", str(home)],
                 ["export", str(tmp_path / "m"), "-o", str(home)]):
        assert main([*argv, "--overwrite"]) == 2
        assert "not with --overwrite either" in capsys.readouterr().err
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == [".bashrc", "docs", "docs/thesis.txt"]
    # A kvlab output of another kind is replaced with --overwrite, and nothing is left beside it.
    target.unlink()
    assert main(["tasks", str(target)]) == 0
    assert main(["export", str(tmp_path / "m"), "-o", str(target)]) == 2
    assert "holds a kvlab task set; to replace it with a HF checkpoint kvlab exported pass --overwrite" in \
        capsys.readouterr().err
    assert main(["export", str(tmp_path / "m"), "-o", str(target), "--overwrite"]) == 0
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "home", "m"]     # no .export.old-PID
    # Its own kind of output is replaced without --overwrite.
    assert main(["export", str(tmp_path / "m"), "-o", str(target), "--dtype", "bf16"]) == 0


def test_overwrite_and_resume_refuse_a_users_files_inside_a_runs_entries(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(out, steps=4)) == 0
    (out / "checkpoints" / "my_notes.txt").write_text("mine")
    (out / "final" / "README.md").write_text("mine too")
    for flag in ("--overwrite", "--resume"):
        assert main(_train(out, flag, steps=6)) == 2
        err = capsys.readouterr().err
        assert "checkpoints/my_notes.txt" in err and "final/README.md" in err and "move them out" in err
    assert (out / "checkpoints" / "my_notes.txt").read_text() == "mine"
    assert (out / "final" / "README.md").read_text() == "mine too"
    (out / "checkpoints" / "my_notes.txt").unlink()
    (out / "final" / "README.md").unlink()
    assert main(_train(out, "--overwrite", steps=2)) == 0


def test_a_command_never_writes_over_or_into_its_input(tmp_path, capsys):
    model = make_model()
    model.tokenizer = ByteTokenizer()
    save_checkpoint(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    for argv in (["convert", str(tmp_path / "m"), "--mqa", "-o", str(tmp_path / "m")],
                 ["convert", str(tmp_path / "m"), "--mqa", "-o", str(tmp_path / "m" / "sub")],
                 ["export", str(tmp_path / "m"), "--format", "kvlab", "--dtype", "fp16", "-o", str(tmp_path / "m")],
                 ["train", "--init", str(tmp_path / "m"), "--max-steps", "1", "--out", str(tmp_path / "m" / "run")]):
        assert main([*argv, "--overwrite"]) == 2
        assert "kvlab does not write over its input" in capsys.readouterr().err
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_to_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    # lr 1e30: the loss is NaN within a step or two, long before the first checkpoint.
    assert main(_train(out, "--lr", "1e30", "--save-every", "50", steps=4)) == 1
    err = capsys.readouterr().err
    assert "before any checkpoint was saved" in err and "--resume" not in err
    assert not out.exists()
    assert main(_train(out, steps=2)) == 0                                 # the plain command runs again


def test_resume_may_lengthen_a_run_shorter_than_its_warmup(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(out, "--warmup-steps", "20", steps=3)) == 0        # warm-up 20 > 3 steps
    assert main(_train(out, "--warmup-steps", "20", "--resume", "--lr", "5e-4", steps=6)) == 0     # lr may change
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6


def test_a_closed_stdout_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "kvlab", "plan", "--preset", "llama2-7b", "--json"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()                               # like `| head -1`
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode in (0, 141)
    # A table (rich) to a reader that is gone before the first line (`kvlab plan ... | true`).
    proc = subprocess.Popen([sys.executable, "-m", "kvlab", "plan", "--preset", "tiny"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode == 141


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, capsys, mask):
    model = make_model()
    model.tokenizer = ByteTokenizer()
    save_checkpoint(model, tmp_path / "m")
    old = os.umask(mask)
    try:
        assert main(["convert", str(tmp_path / "m"), "--mqa", "-o", str(tmp_path / "c")]) == 0
        assert main(_train(tmp_path / "run", steps=2)) == 0
    finally:
        os.umask(old)
    paths = [tmp_path / "c", *(tmp_path / "c").iterdir(), tmp_path / "run", *(tmp_path / "run").rglob("*")]
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_a_file_the_user_put_into_a_kvlab_output_is_never_replaced_with_it(tmp_path, capsys):
    model = make_model()
    model.tokenizer = ByteTokenizer()
    save_checkpoint(model, tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), "--mqa", "-o", str(tmp_path / "c")]) == 0
    (tmp_path / "c" / "NOTES.md").write_text("my notes on this model")
    assert main(["convert", str(tmp_path / "m"), "--mqa", "-o", str(tmp_path / "c")]) == 2
    assert "holds a kvlab checkpoint and, beside it, 1 entry kvlab did not write (NOTES.md)" in \
        capsys.readouterr().err
    assert main(["convert", str(tmp_path / "m"), "--mqa", "-o", str(tmp_path / "c"), "--overwrite"]) == 2
    assert (tmp_path / "c" / "NOTES.md").read_text() == "my notes on this model"
    (tmp_path / "c" / "NOTES.md").unlink()
    assert main(["convert", str(tmp_path / "m"), "--mqa", "-o", str(tmp_path / "c")]) == 0   # its own: replaced


def test_a_run_may_fill_the_current_directory_but_an_output_may_not_replace_it(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["train", "--preset", "tiny", "--out", ".", "--max-steps", "2", "--seq-len", "32", "--batch-size", "2",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "final", "metrics.jsonl", "run.json"]
    assert main(["convert", "final", "--mqa", "-o", ".", "--overwrite"]) == 2
    assert "is the current directory or contains it" in capsys.readouterr().err

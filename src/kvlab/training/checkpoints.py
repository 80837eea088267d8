"""Training checkpoints: ``OUT/checkpoints/step_N`` directories, written atomically by rank 0, that
hold the model (or only the adapter) and the trainer state (step, optimizer, RNG) — all that exact
resume needs, since the learning rate and the batches are functions of the step."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvlab.models.decoder import Transformer

from kvlab.errors import CheckpointError, ConfigError
from kvlab.io.atomic import remove_path
from kvlab.training.config import TrainConfig
from kvlab.training.distributed import Dist, full_state
from kvlab.training.groups import checkpoints_hold_adapter_only

STATE_FILE = "trainer_state.pt"


def _has_weights(d: Path) -> bool:
    from kvlab.peft.adapter import WEIGHTS_FILE

    return (d / "model.safetensors").is_file() or (d / WEIGHTS_FILE).is_file()


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary (dot-named) and incomplete ones are ignored."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.name.startswith("step_") and (d / STATE_FILE).is_file() and _has_weights(d):
            found.append(d)
    return sorted(found, key=lambda d: int(d.name.removeprefix("step_")))


def save_training_checkpoint(out_dir: Path, step: int, model: Transformer, optimizer, cfg: TrainConfig,
                             dist_ctx: Dist | None = None, wrapped=None, hooks=None) -> Path | None:
    """Write ``checkpoints/step_N`` (rank 0 only; every rank takes part in gathering under FSDP)."""
    from kvlab.io.kvlab_format import save_checkpoint

    dist_ctx = dist_ctx or Dist()
    if checkpoints_hold_adapter_only(cfg.train_only):
        return _save_adapter_checkpoint(out_dir, step, model, optimizer, cfg, dist_ctx, hooks)
    model_state, optim_state = full_state(model, wrapped, optimizer, dist_ctx)
    target = out_dir / "checkpoints" / f"step_{step:07d}"
    if not dist_ctx.is_main:
        dist_ctx.barrier()
        return target
    state = _trainer_state(step, optim_state, cfg, dist_ctx)
    # The model (and its provenance) via the kvlab format; the trainer state beside it, in the
    # same temporary directory, so the rename publishes both at once.
    save_checkpoint(model, target, extra=lambda tmp: torch.save(state, tmp / STATE_FILE), state_dict=model_state)
    _drop_old_checkpoints(out_dir, cfg)
    dist_ctx.barrier()
    return target


def _trainer_state(step: int, optim_state: dict, cfg: TrainConfig, dist_ctx: Dist, hooks=None) -> dict:
    """What resuming needs besides the weights: step, optimizer, RNG, config, hooks' state."""
    state = {"step": step, "optimizer": optim_state, "torch_rng": torch.get_rng_state(),
             "train_config": asdict(cfg), "world_size": dist_ctx.world_size, "strategy": dist_ctx.strategy,
             "hooks": hooks.state_dict() if hooks is not None else None}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _drop_old_checkpoints(out_dir: Path, cfg: TrainConfig) -> None:
    for old in checkpoint_dirs(out_dir)[:-cfg.keep_last]:
        _discard(old)


def _discard(checkpoint: Path) -> None:
    """Remove a checkpoint directory; renamed to a dot-name first, so a kill mid-way leaves no
    half-deleted ``step_N`` behind (:func:`clean_checkpoints` removes the rest on the next start)."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.discard-{os.getpid()}")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_checkpoints(out_dir: Path) -> list[str]:
    """Remove what a killed run left in ``checkpoints/``: temporary (dot-named) directories of an
    interrupted save or pruning, and ``step_N`` directories missing their weights or state."""
    root = out_dir / "checkpoints"
    removed = []
    if not root.is_dir():
        return removed
    for d in sorted(root.iterdir()):
        incomplete = d.name.startswith("step_") and not (d.is_dir() and (d / STATE_FILE).is_file() and _has_weights(d))
        if d.name.startswith(".step_") or incomplete:
            remove_path(d)
            removed.append(d.name)
    return removed


def _save_adapter_checkpoint(out_dir: Path, step: int, model, optimizer, cfg: TrainConfig, dist_ctx: Dist,
                             hooks) -> Path:
    from kvlab.peft.adapter import save_adapter

    if dist_ctx.enabled:
        raise ConfigError("adapter fine-tuning runs in one process; launch kvlab finetune without torchrun")
    target = out_dir / "checkpoints" / f"step_{step:07d}"
    state = _trainer_state(step, optimizer.state_dict(), cfg, dist_ctx, hooks)
    save_adapter(model, target, extra=lambda tmp: torch.save(state, tmp / STATE_FILE))
    _drop_old_checkpoints(out_dir, cfg)
    return target


# TrainConfig fields that may change between a run and its resumption: when things are logged,
# evaluated and saved, and max_steps — continuing a run for longer (its learning-rate schedule
# then stretches to the new length from the resumed step on; the steps before keep theirs).
# Settings a resumed run may change: where and how often it reports and saves, how long it runs, and
# its peak learning rate (the way on after a loss spike).
RESUMABLE_CHANGES = ("out_dir", "eval_every", "eval_batches", "save_every", "keep_last", "log_every", "max_steps",
                     "lr")
# What a training run writes into its directory (besides the record of :mod:`kvlab.io.rundir`).
TRAIN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final")


def run_settings(cfg: TrainConfig) -> dict:
    """The TrainConfig fields that give a run its meaning (a resume must repeat them)."""
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def _read_checkpoint(checkpoint: Path, cfg: TrainConfig) -> tuple[dict, dict]:
    """(trainer state, weights) of one checkpoint; CheckpointError if it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kvlab.peft.adapter import WEIGHTS_FILE

    try:
        state = torch.load(checkpoint / STATE_FILE, weights_only=False)
        weights = load_file(str(checkpoint / (WEIGHTS_FILE if checkpoints_hold_adapter_only(cfg.train_only)
                                             else "model.safetensors")))
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{checkpoint.name} is damaged ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise CheckpointError(f"{checkpoint.name} is damaged (its trainer state lacks the step or optimizer)")
    return state, weights


def restore_checkpoint(out_dir: Path, model: Transformer, cfg: TrainConfig, hooks=None, log=None) -> dict:
    """Load the newest complete, undamaged checkpoint's weights into ``model`` (before any
    sharding) and the hooks' state; return the trainer state (step, optimizer, RNG). Damaged
    newer checkpoints (a truncated file after a crash) are reported and removed; a checkpoint of
    a run with other settings is refused, naming the fields."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    found = checkpoint_dirs(out_dir)
    if not found:
        raise ConfigError(f"--resume: no complete checkpoint in {out_dir / 'checkpoints'} (the run stopped before "
                          f"its first save); start over with --overwrite instead of --resume")
    for last in reversed(found):
        try:
            state, weights = _read_checkpoint(last, cfg)
        except CheckpointError as e:
            older = [d.name for d in found if d != last and found.index(d) < found.index(last)]
            log(f"warning: --resume: checkpoint {e}; " + (f"falling back to {older[-1]}" if older else
                                                           "no older checkpoint is left"))
            _discard(last)
            continue
        break
    else:
        raise CheckpointError(f"--resume: every checkpoint in {out_dir / 'checkpoints'} is damaged; start over "
                              f"with --overwrite")
    saved = {k: v for k, v in (state.get("train_config") or {}).items() if k not in RESUMABLE_CHANGES}
    now = run_settings(cfg)
    changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if saved and saved.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"--resume: {last} was written by a run with other settings ({'; '.join(changed)}); "
                          f"resume with the same settings, or start over with --overwrite")
    if checkpoints_hold_adapter_only(cfg.train_only):
        from kvlab.peft.adapter import load_adapter_weights

        load_adapter_weights(model, last)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise ConfigError(f"--resume: {last} does not hold this model's weights")
    if hooks is not None and state.get("hooks") is not None:
        hooks.load_state_dict(state["hooks"])
    return state

"""Training checkpoints: ``OUT/checkpoints/step_N`` directories, written atomically by rank 0, that
hold the model (or only the adapter) and the trainer state (step, optimizer, RNG) — all that exact
resume needs, since the learning rate and the batches are functions of the step."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvlab.models.decoder import Transformer
    from kvlab.training.loop import TrainConfig

from kvlab.errors import ConfigError
from kvlab.training.distributed import Dist, full_state

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
    if cfg.train_only == "adapter":
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
        shutil.rmtree(old, ignore_errors=True)


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


def restore_checkpoint(out_dir: Path, model: Transformer, cfg: TrainConfig, hooks=None) -> dict:
    """Load the last complete checkpoint's weights into ``model`` (before any sharding) and the
    hooks' state; return the trainer state (step, optimizer, RNG)."""
    from safetensors.torch import load_file

    found = checkpoint_dirs(out_dir)
    if not found:
        raise ConfigError(f"--resume: no complete checkpoint in {out_dir / 'checkpoints'}")
    last = found[-1]
    state = torch.load(last / STATE_FILE, weights_only=False)
    if cfg.train_only == "adapter":
        from kvlab.peft.adapter import load_adapter_weights

        load_adapter_weights(model, last)
    else:
        weights = load_file(str(last / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise ConfigError(f"--resume: {last} does not hold this model's weights")
    if hooks is not None and state.get("hooks") is not None:
        hooks.load_state_dict(state["hooks"])
    return state

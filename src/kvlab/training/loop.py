"""The training loop: one loop for every objective and every verb (pretraining, uptraining,
fine-tuning; distillation and preference/RL objectives plug in the same way).

AdamW (β 0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay to 10 % of
the peak learning rate, gradient clipping, gradient accumulation, bf16 autocast on GPUs.

Exact resume: the learning rate and the training batches are pure functions of the step (see
:class:`kvlab.data.windows.Windows`), so a checkpoint holds only the weights, the optimizer state, the RNG
state and the step. Checkpoints are directories written atomically (a temporary name, renamed
when complete); a run killed at any moment resumes from the last complete one and reproduces the
uninterrupted run's losses exactly.

Fine-tuning (``train_only="adapter"``, :mod:`kvlab.peft`): only the adapter's parameters train and
a checkpoint holds only the adapter (a 4-bit base cannot be written as safetensors, and need not
be: it never changes).

What is minimized is an :class:`~kvlab.training.objectives.Objective` (cross-entropy by default):
the loss of each micro-batch is its sum over counted units divided by the whole update's count, so
gradient accumulation and several processes weigh every unit alike. A step is one batch; most
objectives make one optimizer update per step, online RL may make several on the same rollouts
(``Objective.updates_per_batch``), and checkpoints fall between steps, so resume stays exact.
Devices and torchrun live in :mod:`kvlab.training.distributed`, checkpoints in
:mod:`kvlab.training.checkpoints`, the settings in :mod:`kvlab.training.config` and what trains
(modes as unions of parameter groups) in :mod:`kvlab.training.groups`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from kvlab.errors import ConfigError, Interrupted, KvlabError
from kvlab.models.decoder import Transformer
from kvlab.training.checkpoints import checkpoint_dirs, clean_checkpoints, restore_checkpoint, save_training_checkpoint
from kvlab.training.config import TrainConfig
from kvlab.training.distributed import Dist, wrap_model
from kvlab.training.groups import trainable_parameters
from kvlab.training.objectives import CrossEntropy, Objective

__all__ = ["TrainConfig", "TrainingError", "evaluate_loss", "lr_at", "make_optimizer", "steps_for_budget", "train",
           "trainable_parameters"]


class TrainingError(KvlabError, RuntimeError):
    """The run cannot continue (e.g. the loss became NaN)."""


def steps_for_budget(tokens_per_step: int, *, tokens: int | None = None, alpha: float | None = None,
                     reference_tokens: int | None = None) -> int:
    """Optimizer steps for a token budget, or for ``alpha × reference_tokens`` (an uptraining budget
    expressed as a fraction of a pretraining budget, as in the GQA paper's α)."""
    if alpha is not None:
        if reference_tokens is None:
            raise ConfigError("--alpha needs --reference-tokens (the pretraining budget it is a fraction of)")
        if not (math.isfinite(alpha) and 0 < alpha):
            raise ConfigError(f"--alpha {alpha} must be a positive fraction of --reference-tokens")
        if reference_tokens < 1:
            raise ConfigError(f"--reference-tokens {reference_tokens} must be a positive token count")
        tokens = int(alpha * reference_tokens)
    if tokens is None:
        raise ConfigError("give --max-steps, --tokens, or --alpha with --reference-tokens")
    if tokens < 1:
        raise ConfigError(f"a budget of {tokens} tokens trains nothing; give a positive number of tokens")
    return max(1, math.ceil(tokens / tokens_per_step))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps`` (at most the run's steps: a run shorter than its warm-up
    reaches the peak at its last step), then cosine from ``lr`` down to ``min_lr_ratio·lr``."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, cfg.max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             fused=False)


# --------------------------------------------------------------------------------- training
def _on_device(batch, device, rows: slice | None = None) -> tuple[torch.Tensor, ...]:
    return tuple((t if rows is None else t[rows]).to(device) for t in batch)


def evaluate_loss(model, windows, n_batches: int, device, dist_ctx: Dist | None = None,
                  objective: Objective | None = None) -> float:
    """Mean loss per counted unit over the first ``n_batches`` validation batches (all ranks' rows)."""
    objective = objective or CrossEntropy()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_batches):
            batch = _on_device(windows.batch(i), device)
            total += float(objective.loss(model, batch))
            count += objective.count(batch)
    model.train()
    return (dist_ctx or Dist()).mean(total / max(count, 1))


def _truncate_metrics(metrics_path: Path, step: int) -> None:
    """Drop what a killed run logged after its last checkpoint, and a line torn by the kill."""
    if not metrics_path.is_file():
        return
    keep = []
    for line in metrics_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue                          # torn (or not JSON): nothing resumable depends on it
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    tmp = metrics_path.with_name(f".{metrics_path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(metrics_path)


def train(model: Transformer, train_windows, val_windows, cfg: TrainConfig, *,
          resume: bool = False, device: str | torch.device = "cpu", quiet: bool = False,
          dist_ctx: Dist | None = None, hooks=None, objective: Objective | None = None) -> dict:
    """Run (or resume) training; returns a summary. Metrics go to ``out_dir/metrics.jsonl``.

    ``train_windows``/``val_windows`` give ``batch(step)``, a tuple of row-first tensors that the
    ``objective`` (default :class:`CrossEntropy`) reads. Under torchrun pass ``dist_ctx``
    (:meth:`Dist.from_env`) and windows built with this rank: each rank computes its rows of the
    global batch; rank 0 logs and writes checkpoints. ``hooks`` (AdaLoRA's rank allocator):
    ``regularizer()`` is added to the loss, ``after_step(n)`` runs after optimizer step ``n`` with
    the gradients still present, and if the hooks have ``stop_requested()`` and it returns True
    after a step (a wall-time budget spent), that step is checkpointed and training ends there;
    ``summary["step"]`` says where.
    """
    dist_ctx = dist_ctx or Dist()
    objective = objective or CrossEntropy()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    if model.device != device:     # (a 4-bit NF4 base cannot be moved in place; it is made on its device)
        model.to(device)
    objective.prepare(device)
    model.train()
    metrics_path = out_dir / "metrics.jsonl"
    if dist_ctx.is_main:
        clean_checkpoints(out_dir)
    if not resume and checkpoint_dirs(out_dir):
        raise ConfigError(f"{out_dir / 'checkpoints'} holds an earlier run's checkpoints; resume it, or start in "
                          f"a new directory (kvlab's verbs: --resume or --overwrite)")
    state = restore_checkpoint(out_dir, model, cfg, hooks) if resume else None
    start = state["step"] if state is not None else 0
    trainable_parameters(model, cfg.train_only)        # sets requires_grad; wrapping keeps the flags
    wrapped = wrap_model(model, dist_ctx, device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]   # sharded ones under FSDP
    optimizer = make_optimizer(params, cfg)
    if state is not None:
        if dist_ctx.enabled and dist_ctx.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if dist_ctx.is_main:
            _truncate_metrics(metrics_path, start)
    elif dist_ctx.is_main and metrics_path.exists():
        metrics_path.unlink()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    rows = objective.update_rows(cfg.batch_size // dist_ctx.world_size)   # an update's rows on this process
    micro = rows // cfg.grad_accum
    if micro < 1 or rows % cfg.grad_accum:
        raise ConfigError(f"batch_size={cfg.batch_size} over {dist_ctx.world_size} process(es) with "
                          f"grad_accum={cfg.grad_accum} leaves no whole micro-batch; adjust them")
    summary = {"start_step": start}
    found = checkpoint_dirs(out_dir)
    last_good = found[-1] if found else None
    try:
        _steps(model, wrapped, objective, optimizer, params, train_windows, val_windows, cfg, start, device, dist_ctx,
               hooks, autocast, micro, metrics_path, quiet, summary, last_good)
    except KeyboardInterrupt:
        found = checkpoint_dirs(out_dir)
        done = summary.get("step", start)
        raise Interrupted(f"interrupted after step {done} of {cfg.max_steps}; the last checkpoint is "
                          + (f"{found[-1].name}" if found else "none (nothing saved yet)"),
                          resumable=bool(found)) from None
    model.eval()
    return summary


def _update(wrapped, objective, batch, cfg, micro, device, autocast, hooks, dist_ctx) -> float:
    """The gradients of one optimizer update on ``batch`` (``grad_accum`` micro-batches of ``micro``
    rows); returns its loss (every process's mean)."""
    n_counted = max(1, objective.count(batch))
    loss_sum = 0.0
    for m in range(cfg.grad_accum):
        micro_batch = _on_device(batch, device, slice(m * micro, (m + 1) * micro))
        if autocast is not None:
            with autocast:
                loss = objective.loss(wrapped, micro_batch) / n_counted
        else:
            loss = objective.loss(wrapped, micro_batch) / n_counted
        loss_sum += float(loss.detach())      # the reported loss is the objective's alone
        if hooks is not None:
            loss = loss + hooks.regularizer() / cfg.grad_accum
        loss.backward()
    return dist_ctx.mean(loss_sum)            # the global batch's loss, identical on every rank


def _steps(model, wrapped, objective, optimizer, params, train_windows, val_windows, cfg, start, device, dist_ctx,
           hooks, autocast, micro, metrics_path, quiet, summary, last_good) -> None:
    """The optimizer steps from ``start`` to ``cfg.max_steps``; ``summary`` gets the last record."""
    out_dir = Path(cfg.out_dir)
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start, cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_windows.batch(step)         # this rank's rows of the global batch
        losses = []
        for update in range(objective.updates_per_batch):
            if update:
                optimizer.zero_grad(set_to_none=True)
            losses.append(_update(wrapped, objective, objective.batch_for_update(wrapped, batch, update), cfg, micro,
                                  device, autocast, hooks, dist_ctx))
            if not math.isfinite(losses[-1]):
                what = f"the loss is {losses[-1]} at step {step + 1}"
                if last_good is None:
                    raise TrainingError(f"{what}; stopping before any checkpoint was saved: lower --lr or check the "
                                        f"data, and run the command again")
                raise TrainingError(f"{what}; stopping. The last good checkpoint is {last_good}; lower --lr or check "
                                    f"the data, then --resume (a changed --lr is taken)")
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
            optimizer.step()
        loss_sum = sum(losses) / len(losses)      # several updates per batch (RL reusing rollouts): their mean
        if hooks is not None:
            hooks.after_step(step + 1)
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        tokens_since += cfg.tokens_per_step
        record = {"step": done, "tokens": done * cfg.tokens_per_step, "loss": loss_sum, "lr": lr,
                  **objective.pop_metrics()}
        if val_windows is not None and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            record["val_loss"] = evaluate_loss(wrapped, val_windows, cfg.eval_batches, device, dist_ctx, objective)
        now = time.perf_counter()
        if done % cfg.log_every == 0 or done == cfg.max_steps or "val_loss" in record:
            record["tokens_per_s"] = tokens_since / (now - t_last)
            t_last, tokens_since = now, 0
            if not quiet and dist_ctx.is_main:
                val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
                print(f"step {done}/{cfg.max_steps} loss {loss_sum:.4f}{val} lr {lr:.2e} "
                      f"{record['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
        if dist_ctx.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        summary.update(record)                     # before saving: a Ctrl-C inside the save reports this step
        stop = hooks is not None and getattr(hooks, "stop_requested", lambda: False)()
        if done % cfg.save_every == 0 or done == cfg.max_steps or stop:
            last_good = save_training_checkpoint(out_dir, done, model, optimizer, cfg, dist_ctx, wrapped, hooks)
        if stop:
            break

"""The training loop: pretraining from a config and uptraining from a checkpoint.

AdamW (β 0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay to 10 % of
the peak learning rate, gradient clipping, gradient accumulation, bf16 autocast on GPUs.

Exact resume: the learning rate and the training batches are pure functions of the step (see
:class:`kvlab.data.Windows`), so a checkpoint holds only the weights, the optimizer state, the RNG
state and the step. Checkpoints are directories written atomically (a temporary name, renamed
when complete); a run killed at any moment resumes from the last complete one and reproduces the
uninterrupted run's losses exactly.

Fine-tuning (``train_only="adapter"``, :mod:`kvlab.peft`): only the adapter's parameters train and
a checkpoint holds only the adapter (a 4-bit base cannot be written as safetensors, and need not
be: it never changes). Targets of ``-100`` (SFT prompts, padding) carry no loss; the loss is the
mean over the global batch's counted tokens, so gradient accumulation weighs every token alike.
Batches may add a third element, segment ids for packed rows.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvlab.data import Windows
from kvlab.errors import ConfigError, KvlabError, require_positive_ints
from kvlab.model import Transformer

TRAIN_ONLY = ("all", "attention", "kv", "adapter")
IGNORE_INDEX = -100
STRATEGIES = ("ddp", "fsdp")


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, strategy: str = "ddp", device: torch.device | None = None) -> "Dist":
        """Join the process group torchrun describes (gloo on CPU, NCCL on GPU), if any."""
        import os

        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy={strategy!r} is not one of {list(STRATEGIES)}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(strategy=strategy)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), strategy=strategy)

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def wrap_model(model: Transformer, dist_ctx: Dist, device: torch.device):
    """DDP, or FSDP2 (``fully_shard`` on every block, then the whole model)."""
    if not dist_ctx.enabled:
        return model
    if dist_ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def full_model_state(model: Transformer, dist_ctx: Dist) -> dict:
    """The unsharded model state dict (collective under FSDP: every rank must call it)."""
    if dist_ctx.enabled and dist_ctx.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def _full_state(model: Transformer, wrapped, optimizer, dist_ctx: Dist) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; collective under FSDP."""
    if dist_ctx.enabled and dist_ctx.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return model.state_dict(), optimizer.state_dict()


class TrainingError(KvlabError, RuntimeError):
    """The run cannot continue (e.g. the loss became NaN)."""


@dataclass
class TrainConfig:
    out_dir: str
    max_steps: int
    batch_size: int = 8            # sequences per optimizer step (all accumulation micro-steps)
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    train_only: str = "all"
    data_mode: str = "random"

    def __post_init__(self) -> None:
        require_positive_ints(self, ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every",
                                     "save_every", "keep_last", "log_every", "eval_batches"))
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if self.train_only not in TRAIN_ONLY:
            raise ConfigError(f"train_only={self.train_only!r} is not one of {list(TRAIN_ONLY)}")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def steps_for_budget(tokens_per_step: int, *, tokens: int | None = None, alpha: float | None = None,
                     reference_tokens: int | None = None) -> int:
    """Optimizer steps for a token budget, or for ``alpha × reference_tokens`` (an uptraining budget
    expressed as a fraction of a pretraining budget, as in the GQA paper's α)."""
    if alpha is not None:
        if reference_tokens is None:
            raise ConfigError("--alpha needs --reference-tokens (the pretraining budget it is a fraction of)")
        tokens = int(alpha * reference_tokens)
    if tokens is None:
        raise ConfigError("give --max-steps, --tokens, or --alpha with --reference-tokens")
    return max(1, math.ceil(tokens / tokens_per_step))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` down to ``min_lr_ratio·lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def trainable_parameters(model: Transformer, train_only: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``all``; ``attention`` (every attention projection); ``kv`` (K/V projections only — the
    part a KV conversion changed); ``adapter`` (a :mod:`kvlab.peft` adapter's parameters)."""
    from kvlab.peft.adapter import is_adapter_parameter

    chosen = []
    for name, p in model.named_parameters():
        if train_only == "adapter":
            # Prefix tuning's merged prefixes are frozen on purpose; everything else adapter trains.
            keep = is_adapter_parameter(name) and p.requires_grad
        else:
            keep = not is_adapter_parameter(name) and (
                train_only == "all" or (train_only == "attention" and ".self_attn." in name)
                or (train_only == "kv" and (".k_proj." in name or ".v_proj." in name)))
        p.requires_grad_(keep)
        if keep:
            chosen.append((name, p))
    if not chosen:
        raise ConfigError(f"train_only={train_only!r} selects no parameters of this model")
    return chosen


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             fused=False)


# ------------------------------------------------------------------------------ checkpoints
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
    from kvlab.checkpoints.kvlab_format import save_checkpoint

    dist_ctx = dist_ctx or Dist()
    if cfg.train_only == "adapter":
        return _save_adapter_checkpoint(out_dir, step, model, optimizer, cfg, dist_ctx, hooks)
    model_state, optim_state = _full_state(model, wrapped, optimizer, dist_ctx)
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


def _loss_and_count(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over counted targets (not -100) and their number."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def _forward(model, x: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    return model(x) if segments is None else model(x, segment_ids=segments)


# --------------------------------------------------------------------------------- training
def evaluate_loss(model, windows: Windows, n_batches: int, device, dist_ctx: Dist | None = None) -> float:
    """Mean loss over the first ``n_batches`` validation batches (all ranks' rows)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_batches):
            x, y, *seg = windows.batch(i)
            logits = _forward(model, x.to(device), seg[0].to(device) if seg else None)
            loss, n = _loss_and_count(logits, y.to(device))
            total, count = total + float(loss), count + n
    model.train()
    return (dist_ctx or Dist()).mean(total / max(count, 1))


def train(model: Transformer, train_windows: Windows, val_windows: Windows | None, cfg: TrainConfig, *,
          resume: bool = False, device: str | torch.device = "cpu", quiet: bool = False,
          dist_ctx: Dist | None = None, hooks=None) -> dict:
    """Run (or resume) training; returns a summary. Metrics go to ``out_dir/metrics.jsonl``.

    Under torchrun pass ``dist_ctx`` (:meth:`Dist.from_env`) and windows built with this rank:
    each rank computes its rows of the global batch; rank 0 logs and writes checkpoints.
    ``hooks`` (AdaLoRA's rank allocator): ``regularizer()`` is added to the loss, ``after_step(n)``
    runs after optimizer step ``n`` with the gradients still present.
    """
    dist_ctx = dist_ctx or Dist()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    if model.device != device:     # (a 4-bit NF4 base cannot be moved in place; it is made on its device)
        model.to(device)
    model.train()
    metrics_path = out_dir / "metrics.jsonl"
    start = 0
    state = None
    if resume:
        found = checkpoint_dirs(out_dir)
        if not found:
            raise ConfigError(f"--resume: no complete checkpoint in {out_dir / 'checkpoints'}")
        from safetensors.torch import load_file

        last = found[-1]
        state = torch.load(last / STATE_FILE, weights_only=False)
        if cfg.train_only == "adapter":
            from kvlab.peft.adapter import load_adapter_weights

            load_adapter_weights(model, last)
        else:
            weights = load_file(str(last / "model.safetensors"))
            missing, unexpected = model.load_state_dict(weights, strict=False)   # before any sharding
            if unexpected or [k for k in missing if k != "lm_head.weight"]:
                raise ConfigError(f"--resume: {last} does not hold this model's weights")
        if hooks is not None and state.get("hooks") is not None:
            hooks.load_state_dict(state["hooks"])
        start = state["step"]
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
        if dist_ctx.is_main and metrics_path.is_file():   # drop what was logged after the checkpoint
            keep = [line for line in metrics_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= start]
            metrics_path.write_text("".join(line + "\n" for line in keep))
    elif dist_ctx.is_main and metrics_path.exists():
        metrics_path.unlink()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    micro = cfg.batch_size // dist_ctx.world_size // cfg.grad_accum
    if micro < 1 or (cfg.batch_size // dist_ctx.world_size) % cfg.grad_accum:
        raise ConfigError(f"batch_size={cfg.batch_size} over {dist_ctx.world_size} process(es) with "
                          f"grad_accum={cfg.grad_accum} leaves no whole micro-batch; adjust them")
    t_last, tokens_since = time.perf_counter(), 0
    summary = {"start_step": start}
    found = checkpoint_dirs(out_dir)
    last_good = found[-1] if found else None
    for step in range(start, cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, *seg = train_windows.batch(step)    # this rank's rows of the global batch
        n_counted = max(1, int((y != IGNORE_INDEX).sum()))
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            rows = slice(m * micro, (m + 1) * micro)
            xs, ys = x[rows].to(device), y[rows].to(device)
            segs = seg[0][rows].to(device) if seg else None
            if autocast is not None:
                with autocast:
                    logits = _forward(wrapped, xs, segs)
            else:
                logits = _forward(wrapped, xs, segs)
            loss = _loss_and_count(logits, ys)[0] / n_counted
            loss_sum += float(loss.detach())      # the reported loss is the LM loss alone
            if hooks is not None:
                loss = loss + hooks.regularizer() / cfg.grad_accum
            loss.backward()
        loss_sum = dist_ctx.mean(loss_sum)        # the global batch's loss, identical on every rank
        if not math.isfinite(loss_sum):
            raise TrainingError(f"the loss is {loss_sum} at step {step + 1}; stopping. The last good checkpoint is "
                                f"{last_good or '(none yet)'}; lower --lr or check the data, then --resume")
        torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
        optimizer.step()
        if hooks is not None:
            hooks.after_step(step + 1)
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        tokens_since += cfg.tokens_per_step
        record = {"step": done, "tokens": done * cfg.tokens_per_step, "loss": loss_sum, "lr": lr}
        if val_windows is not None and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            record["val_loss"] = evaluate_loss(wrapped, val_windows, cfg.eval_batches, device, dist_ctx)
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
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            last_good = save_training_checkpoint(out_dir, done, model, optimizer, cfg, dist_ctx, wrapped, hooks)
        summary.update(record)
    model.eval()
    return summary

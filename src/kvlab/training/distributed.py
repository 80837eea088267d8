"""torchrun: this process's rank, DDP or FSDP2 wrapping, and full (unsharded) state dicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvlab.models.decoder import Transformer

from kvlab.errors import ConfigError

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


def full_state(model: Transformer, wrapped, optimizer, dist_ctx: Dist) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; collective under FSDP."""
    if dist_ctx.enabled and dist_ctx.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return model.state_dict(), optimizer.state_dict()

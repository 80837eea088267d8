"""The cache of a compressed-memory layer: a rolling window of recent K/V plus one summary slot per
block of older tokens (the ``compressed`` kind, :mod:`kvlab.attention.compressed`).

The window part is a :class:`~kvlab.cache.rolling.RollingKVLayer` (the last ``window`` positions
of each row). Beside it, every block of ``block`` positions has a slot holding the running sums of
its keys and values (float32, like recurrent states: bf16 would erode the sums) and a count; a slot
whose count reached ``block`` is a complete summary, its mean the slot's key and value. Memory:
``window`` tokens of K/V plus one slot per ``block`` tokens — the pooled term of the accounting.
"""

from __future__ import annotations

import torch

from kvlab.cache.base import CacheStep
from kvlab.cache.rolling import RollingKVLayer
from kvlab.errors import ConfigError

SUM_DTYPE = torch.float32


class PooledKVLayer(RollingKVLayer):
    """The rolling window (``keys``, ``values``, ``pos``) and the block sums ``sum_k``, ``sum_v``
    ``(B, n_kv_head, slots, D)`` with their ``counts (B, slots)``."""

    def __init__(self, batch_size: int, n_kv_head: int, head_dim: int, *, window: int, block: int, max_len: int,
                 dtype: torch.dtype, device: str | torch.device):
        super().__init__(batch_size, n_kv_head, head_dim, window=min(window, max_len), sinks=0, dtype=dtype,
                         device=device)
        self.block = block
        slots = -(-max_len // block)
        self.sum_k = torch.zeros(batch_size, n_kv_head, slots, head_dim, dtype=SUM_DTYPE, device=device)
        self.sum_v = torch.zeros_like(self.sum_k)
        self.counts = torch.zeros(batch_size, slots, dtype=torch.int32, device=device)

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(t.numel() * t.element_size() for t in (self.sum_k, self.sum_v, self.counts))

    def update(self, k: torch.Tensor, v: torch.Tensor, *, step: CacheStep) -> tuple[torch.Tensor, ...]:
        """Store the new ``k, v``: into the window, and added to their blocks' sums. Returns the
        window's keys, values, positions and validity, then the sums and counts."""
        B, _, T, _ = k.shape
        q_pos = step.q_pos.expand(B, T)
        valid = step.q_valid if step.q_valid is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
        add_to_blocks(self.sum_k, self.sum_v, self.counts, k, v, q_pos, valid, self.block)
        return (*super().update(k, v, step=step), self.sum_k, self.sum_v, self.counts)

    def assume_filled(self, n_tokens: int) -> None:
        super().assume_filled(n_tokens)
        starts = torch.arange(self.counts.shape[1], device=self.counts.device) * self.block
        self.counts[:] = (n_tokens - starts).clamp(0, self.block).to(torch.int32)
        if n_tokens == 0:
            self.sum_k.zero_()
            self.sum_v.zero_()

    def write_prefix(self, *prefix: torch.Tensor) -> None:
        raise ConfigError("prefix tuning needs a full KV cache; a compressed-memory layer pools its past (use LoRA "
                          "or prompt tuning)")


def add_to_blocks(sum_k: torch.Tensor, sum_v: torch.Tensor, counts: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  pos: torch.Tensor, valid: torch.Tensor, block: int) -> None:
    """Add the valid tokens' keys and values ``(B, H, T, D)`` at positions ``pos (B, T)`` to the sums
    of their blocks (slot ``pos // block``), in place; count them."""
    H = k.shape[1]
    slot = torch.where(valid, pos.div(block, rounding_mode="floor"), 0).long()
    weight = valid.to(SUM_DTYPE)[:, None, :, None]
    idx = slot[:, None, :, None]
    sum_k.scatter_add_(2, idx.expand(-1, H, -1, sum_k.shape[-1]), k.to(SUM_DTYPE) * weight)
    sum_v.scatter_add_(2, idx.expand(-1, H, -1, sum_v.shape[-1]), v.to(SUM_DTYPE) * weight)
    counts.scatter_add_(1, slot, valid.to(counts.dtype))

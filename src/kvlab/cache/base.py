"""The cache protocol: one cache object for the model, made of one cache layer per layer that
caches something, each layer's kind bringing its own.

The model-wide :class:`~kvlab.cache.cache.KVCache` owns what all layers share — the batch, each
row's length, and the plan of one forward call (:class:`CacheStep`: which positions and slots the
new tokens take). A :class:`CacheLayer` owns one layer's state: full K/V today; rolling windows,
latents, recurrent states, cross-attention K/V and quantized K/V are further layer types. A kind's
attention module calls ``ctx.cache.update(i, *new, step=ctx.step)`` and gets back what it attends to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class CacheStep:
    """Where the tokens of one forward call go, computed once and used by every layer."""

    q_pos: torch.Tensor                 # (B|1, T) positions (= slots) of the new tokens
    q_valid: torch.Tensor | None        # (B, T) False for padding tokens; None if no padding
    k_len: int                          # keys to read: slots [0, k_len) cover every row
    k_valid: torch.Tensor | None        # (B, k_len) slot < new length; None if rows are uniform
    new_lengths: torch.Tensor           # (B,) lengths after this step
    uniform_start: int | None           # all rows start at this length (fast slice writes)
    write_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (row, token, slot)


@runtime_checkable
class CacheLayer(Protocol):
    """One layer's cached state."""

    def update(self, *new: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, ...]:
        """Store this call's new entries; return everything the layer attends to so far."""
        ...

    def write_prefix(self, *prefix: torch.Tensor) -> None:
        """Put trained prefix entries (prefix tuning) into the first slots of every row."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes this layer's buffers hold."""
        ...


def write_entries(buffer: torch.Tensor, new: torch.Tensor, step: CacheStep) -> None:
    """Store ``new (B, heads, T, D)`` into ``buffer (B, heads, max_len, D)`` at the step's slots."""
    if step.uniform_start is not None:
        s = step.uniform_start
        buffer[:, :, s:s + new.shape[2]] = new
    else:
        rows, toks, slots = step.write_index
        # Advanced indices on dims 0 and 2 with a slice between: the indexed result is
        # (*index_shape, heads, D), matching new[rows, :, toks].
        buffer[rows, :, slots] = new[rows, :, toks].to(buffer.dtype)

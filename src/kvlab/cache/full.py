"""The full K/V cache layer of the ``gqa`` kind: ``(B, n_kv_head, max_len, head_dim)`` for K and V.

Row ``b`` holds its tokens in slots ``[0, lengths[b])`` in order, so a token's slot *is* its
position: padding in the input is never written (a left-padded prompt is compacted on the way in),
each row's RoPE positions are simply its slot indices, and kernels see ragged rows as plain per-row
lengths.
"""

from __future__ import annotations

import torch

from kvlab.cache.base import CacheStep, write_entries


class FullKVLayer:
    """Preallocated K and V buffers of one KV-producing layer."""

    token_fields = ("keys", "values")    # indexed by token slot (dim 2): a paged pool splits them in blocks

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: str | torch.device, value_dim: int | None = None):
        self.keys = torch.zeros(batch_size, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch_size, n_kv_head, max_len, value_dim or head_dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def update(self, k: torch.Tensor, v: torch.Tensor, *, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``k, v (B, n_kv_head, T, D)``; return the layer's K/V so far."""
        write_entries(self.keys, k, step)
        write_entries(self.values, v, step)
        return self.read(step)

    def read(self, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, :step.k_len], self.values[:, :, :step.k_len]

    def write_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        self.keys[:, :, :n] = k.to(self.keys.dtype)
        self.values[:, :, :n] = v.to(self.values.dtype)

"""The latent cache layer of the ``mla`` and ``lowrank`` kinds: one buffer ``(B, 1, max_len, width)``.

MLA (width ``kv_lora_rank + qk_rope_head_dim``): each slot holds a token's latent ``c`` (after the
optional latent norm) followed by its shared RoPE key, already rotated. Absorbed decoding attends
with the whole entry as a single shared key head and its first ``kv_lora_rank`` channels as the
value (a view, no copy), so every head reads each latent once. ``lowrank`` (width ``k_rank +
v_rank``): a token's key latent, then its value latent, both before any rotation. Slots are
positions, as in :mod:`kvlab.cache.full`.
"""

from __future__ import annotations

import torch

from kvlab.cache.base import CacheStep, write_entries
from kvlab.errors import ConfigError


class LatentLayer:
    """Preallocated latent entries of one MLA or lowrank layer."""

    token_fields = ("entries",)    # indexed by token slot (dim 2): a paged pool splits them in blocks

    def __init__(self, batch_size: int, max_len: int, width: int, *, dtype: torch.dtype,
                 device: str | torch.device):
        self.entries = torch.zeros(batch_size, 1, max_len, width, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.entries.numel() * self.entries.element_size()

    def update(self, entries: torch.Tensor, *, step: CacheStep) -> tuple[torch.Tensor]:
        """Store the new ``entries (B, 1, T, width)``; return the layer's entries so far."""
        write_entries(self.entries, entries, step)
        return (self.entries[:, :, :step.k_len],)

    def write_prefix(self, *prefix: torch.Tensor) -> None:
        raise ConfigError("prefix tuning writes per-head keys and values, which a latent-cache layer (mla, lowrank) "
                          "does not cache; use LoRA or prompt tuning with these models")

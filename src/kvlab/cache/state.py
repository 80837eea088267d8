"""The recurrent-state cache layer of linear attention: a fixed-size state per layer and row.

Linear attention summarises everything a row has seen in ``S = Σ decay · φ(k) vᵀ`` (``(n_kv_head,
features, v_dim)``) and its normaliser ``z = Σ decay · φ(k)`` (``(n_kv_head, features)``), so the
cache of a row is the same size after ten tokens or a million: bytes per sequence, none per
token. States are kept in float32 whatever the cache dtype — they are running sums, which bf16
would erode step after step — and counted so by the kind's accounting.
"""

from __future__ import annotations

import torch

from kvlab.cache.base import CacheStep
from kvlab.errors import ConfigError

STATE_DTYPE = torch.float32


class RecurrentStateLayer:
    """``S (B, n_kv_head, features, v_dim)`` and ``z (B, n_kv_head, features)`` of one layer."""

    def __init__(self, batch_size: int, n_kv_head: int, features: int, v_dim: int, *, device: str | torch.device):
        self.S = torch.zeros(batch_size, n_kv_head, features, v_dim, dtype=STATE_DTYPE, device=device)
        self.z = torch.zeros(batch_size, n_kv_head, features, dtype=STATE_DTYPE, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.S, self.z))

    def update(self, S: torch.Tensor, z: torch.Tensor, *, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the state by the one after this call's tokens (computed by the layer from
        :meth:`read`); return it."""
        self.S, self.z = S.to(STATE_DTYPE), z.to(STATE_DTYPE)
        return self.S, self.z

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.S, self.z

    def assume_filled(self, n_tokens: int) -> None:
        if n_tokens == 0:                      # KVCache.reset(): an empty history
            self.S = torch.zeros_like(self.S)
            self.z = torch.zeros_like(self.z)

    def write_prefix(self, *prefix: torch.Tensor) -> None:
        raise ConfigError("prefix tuning writes keys and values, which a linear-attention layer folds into a state; "
                          "use LoRA or prompt tuning with linear attention")

"""The rolling K/V cache of a windowed layer (Mistral's rolling buffer, with StreamingLLM's sinks).

A layer that only ever looks ``window`` positions back needs no more than that: this layer keeps,
per row, the first ``sinks`` positions forever and the last ``window`` positions in a ring, so its
memory is ``sinks + window`` entries whatever the length of the sequence. Position ``p`` lives in
slot ``p`` if ``p < sinks``, else in slot ``sinks + (p - sinks) mod window``; ``pos`` records which
position each slot holds (-1: empty).

:meth:`RollingKVLayer.update` returns what the new tokens attend to — the stored entries in position
order, then the new ones — together with their positions and validity, from which the layer builds
its mask (:meth:`kvlab.attention.context.ForwardContext.mask` with ``source``); only then are the
new entries written, the last ``window`` of each row and any sink positions among them. A prefill
longer than the window therefore still attends correctly within itself.
"""

from __future__ import annotations

import torch

from kvlab.cache.base import CacheStep
from kvlab.errors import ConfigError


class RollingKVLayer:
    """K and V of one windowed producer: ``(B, n_kv_head, sinks + window, D)`` and the slot positions."""

    def __init__(self, batch_size: int, n_kv_head: int, head_dim: int, *, window: int, sinks: int,
                 dtype: torch.dtype, device: str | torch.device, value_dim: int | None = None):
        self.window, self.sinks = window, sinks
        slots = sinks + window
        self.keys = torch.zeros(batch_size, n_kv_head, slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch_size, n_kv_head, slots, value_dim or head_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch_size, slots), -1, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def _stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored entries of every row in position order (empty slots, position -1, first)."""
        order = self.pos.argsort(dim=1)
        H, Dk, Dv = self.keys.shape[1], self.keys.shape[3], self.values.shape[3]
        idx = order[:, None, :, None]
        keys = self.keys.gather(2, idx.expand(-1, H, -1, Dk))
        values = self.values.gather(2, idx.expand(-1, H, -1, Dv))
        return keys, values, self.pos.gather(1, order)

    def update(self, k: torch.Tensor, v: torch.Tensor, *, step: CacheStep
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new ``k, v (B, n_kv_head, T, D)``; return the keys and values the new tokens
        attend to, with their positions and validity ``(B, n + T)``."""
        B, _, T, _ = k.shape
        q_pos = step.q_pos.expand(B, T)
        q_valid = step.q_valid if step.q_valid is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
        if T == 1:
            # A decode step: its token's slot held the position `window` back, which the new query no
            # longer sees, so write first and attend over the ring as it lies — no copy, no reorder
            # (the mask reads each slot's position; the order of keys does not matter).
            self._write(k, v, q_pos, q_valid, step)
            return self.keys, self.values, self.pos, self.pos >= 0
        old_k, old_v, old_pos = self._stored()
        keys = torch.cat([old_k, k.to(old_k.dtype)], dim=2)
        values = torch.cat([old_v, v.to(old_v.dtype)], dim=2)
        positions = torch.cat([old_pos, q_pos], dim=1)
        valid = torch.cat([old_pos >= 0, q_valid], dim=1)
        self._write(k, v, q_pos, q_valid, step)
        return keys, values, positions, valid

    def _write(self, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, q_valid: torch.Tensor,
               step: CacheStep) -> None:
        """Keep each row's sink positions and its last `window` positions; within one call no two
        kept tokens share a slot, so the scatter has no conflicting writes."""
        keep = q_valid & ((q_pos < self.sinks) | (q_pos >= step.new_lengths.unsqueeze(1) - self.window))
        rows, toks = keep.nonzero(as_tuple=True)
        p = q_pos[rows, toks]
        slot = torch.where(p < self.sinks, p, self.sinks + (p - self.sinks) % max(self.window, 1))
        self.keys[rows, :, slot] = k[rows, :, toks].to(self.keys.dtype)
        self.values[rows, :, slot] = v[rows, :, toks].to(self.values.dtype)
        self.pos[rows, slot] = p

    def assume_filled(self, n_tokens: int) -> None:
        """Every row holds positions ``[0, n_tokens)`` (as far as it keeps them); for benchmarks that
        write the buffers directly and for :meth:`KVCache.reset` (``n_tokens=0``)."""
        self.pos.fill_(-1)
        p = torch.arange(n_tokens, device=self.pos.device)
        p = p[(p < self.sinks) | (p >= n_tokens - self.window)]
        slot = torch.where(p < self.sinks, p, self.sinks + (p - self.sinks) % max(self.window, 1))
        self.pos[:, slot] = p

    def write_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise ConfigError("prefix tuning needs a full KV cache; this layer keeps a rolling window (its prefix "
                          "would roll out of it)")

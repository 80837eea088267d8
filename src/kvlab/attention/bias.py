"""Additive score biases: what ALiBi, T5's relative position bias and other priors add to the
attention scores before the softmax.

A bias is either a dense tensor broadcastable to ``(B, n_head, Tq, Tk)`` or a :class:`ScoreBias`,
a function of the query and key *positions* (the same positions the mask rule uses), which a tiled
backend evaluates tile by tile without ever materializing ``Tq × Tk``. Backends that cannot add a
bias (or cannot differentiate through a learned one) say so through ``supports``, and ``auto``
picks one that can.
"""

from __future__ import annotations

import torch
from torch import nn


class ScoreBias(nn.Module):
    """Base class of position-defined biases: ``forward(q_pos (B|1, Tq), k_pos (B|1, Tk))`` returns
    ``(B|1, n_head|1, Tq, Tk)`` floats that are added to the scaled scores."""

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())


def bias_requires_grad(bias) -> bool:
    if bias is None:
        return False
    if isinstance(bias, torch.Tensor):
        return torch.is_grad_enabled() and bias.requires_grad
    return bias.requires_grad


def bias_tile(bias, mask, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor | None:
    """The bias for queries ``i0:i1`` and keys ``j0:j1``, ``(B|1, H|1, bq, bk)``; None without one."""
    if bias is None:
        return None
    if isinstance(bias, torch.Tensor):
        return bias[..., i0:i1, j0:j1]
    return bias(mask.q_pos[:, i0:i1], mask.k_pos[:, j0:j1])


def grouped(bias: torch.Tensor, n_kv_head: int) -> torch.Tensor:
    """``(B|1, Hq|1, Tq, Tk)`` -> ``(B|1, Hkv|1, G|1, Tq, Tk)`` to add to grouped scores."""
    b, h, tq, tk = bias.shape
    if h == 1:
        return bias.view(b, 1, 1, tq, tk)
    return bias.view(b, n_kv_head, h // n_kv_head, tq, tk)

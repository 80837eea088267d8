"""Additive score biases: what ALiBi, T5's relative position bias and other priors add to the
attention scores before the softmax.

A bias is either a dense tensor broadcastable to ``(B, n_head, Tq, Tk)`` or a :class:`ScoreBias`,
a function of the query and key *positions* (the same positions the mask rule uses), which a tiled
backend evaluates tile by tile without ever materializing ``Tq × Tk``. Backends that cannot add a
bias (or cannot differentiate through a learned one) say so through ``supports``, and ``auto``
picks one that can.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ScoreBias(nn.Module):
    """Base class of position-defined biases: ``forward(q_pos (B|1, Tq), k_pos (B|1, Tk))`` returns
    ``(B|1, n_head|1, Tq, Tk)`` floats that are added to the scaled scores."""

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): the geometric sequence ``2^(-8/n)^(i+1)`` for a
    power-of-two ``n``; otherwise those of the nearest lower power of two followed by every other
    slope of the next one (the paper's recipe, as BLOOM and MPT compute it)."""
    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    low = 2 ** math.floor(math.log2(n_head))
    slopes = powers(low) + powers(2 * low)[0::2][:n_head - low]
    return torch.tensor(slopes, dtype=torch.float32)


class AlibiBias(ScoreBias):
    """ALiBi: head ``h`` adds ``slope_h · (k_pos − q_pos)`` to its scores — a linear penalty on the
    distance, no position embedding. Fixed (no parameter), so every backend that adds a positional
    bias can serve it, tile by tile. The slopes are kept outside the module state, in float32 per
    device (like RoPE's frequencies): ``model.to(bf16)`` or a meta-device load cannot touch them.
    ``(k − q)`` rather than BLOOM's ``k``: the softmax is the same (a constant per query row), the
    numbers stay small at any position."""

    def __init__(self, n_head: int):
        super().__init__()
        self.n_head = n_head
        self._slopes: dict[torch.device, torch.Tensor] = {}

    def slopes(self, device: torch.device) -> torch.Tensor:
        if device not in self._slopes:
            self._slopes[device] = alibi_slopes(self.n_head).to(device)
        return self._slopes[device]

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = (k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)).float()      # (B|1, Tq, Tk)
        return self.slopes(q_pos.device).view(1, -1, 1, 1) * distance.unsqueeze(1)


def t5_relative_buckets(relative_position: torch.Tensor, num_buckets: int, max_distance: int,
                        bidirectional: bool) -> torch.Tensor:
    """T5's bucket of each relative position ``k_pos − q_pos`` (Raffel et al. 2020, §2.1): half of
    the buckets (per direction, when bidirectional) are exact distances 0, 1, 2, ...; the others
    cover logarithmically larger distances up to ``max_distance``, beyond which all share the last
    bucket. A decoder (not bidirectional) only has the past: distances ``q_pos − k_pos >= 0``."""
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp_min(0)
    max_exact = num_buckets // 2
    # log-spaced buckets for max_exact <= distance < max_distance (the clamp keeps log() finite
    # for the small distances the where() discards)
    scaled = torch.log(distance.clamp_min(1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp_max(num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5RelativeBias(ScoreBias):
    """T5's learned relative position bias: one scalar per (bucket of relative position, head),
    added to the scores of every layer (T5 computes it in the first layer and shares it). Trainable,
    so the backends that add it are those that differentiate through it (``sdpa``, ``reference``;
    ``flash`` in inference)."""

    def __init__(self, n_head: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = False):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_head)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        relative = k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)                  # (B|1, Tq, Tk)
        buckets = t5_relative_buckets(relative, self.num_buckets, self.max_distance, self.bidirectional)
        return self.relative_attention_bias(buckets).permute(0, 3, 1, 2)     # (B|1, H, Tq, Tk)


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

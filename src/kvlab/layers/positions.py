"""Token positions: what RoPE, learned position embeddings and the mask rule read.

A position counts real tokens of one sequence (padding does not advance it); packed rows restart
positions at every segment.
"""

from __future__ import annotations

import torch


def positions_from_attention_mask(attention_mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token positions for a ``(B, T)`` 0/1 mask: real tokens count 0, 1, 2... from ``start``.

    Padding tokens get the position of the previous real token (clamped at ``start``); they are
    masked out anyway, and the clamp keeps them inside RoPE / embedding tables.
    """
    pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    if start is not None:
        pos = pos + start.view(-1, 1)
    return pos


def positions_in_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Per-token positions ``(B, T)`` that restart at 0 where the segment id changes (packed rows)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - first

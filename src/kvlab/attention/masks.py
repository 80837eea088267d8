"""Boolean "may attend" masks, built in one place.

Every query and key carries a *position* (its index in its own sequence, not counting padding)
and a *valid* flag (False for padding). Query ``q`` may attend to key ``k`` of the same row when
both are valid, ``pos_k <= pos_q`` (causal) and ``pos_q - pos_k < window`` (sliding window) or
``pos_k < sinks`` (StreamingLLM's attention sinks: the first positions stay visible to a window).
Packed rows (several documents in one row, SFT packing) add a *segment* id per token: a query
attends only to keys of its own segment. That one rule covers a padded batch without a cache (positions
count real tokens, so left and
right padding behave the same), a prefill or decode step against a KV cache (key positions are
cache slots), and their combination.

:class:`AttentionMask` keeps the rule in that structured form so a tiled kernel can evaluate it
per tile; :meth:`AttentionMask.dense` materializes the ``(B, 1, Tq, Tk)`` boolean tensor for
backends that take one. A query with nothing to attend to (a padding query) has an all-False
row; every backend turns that row into zeros, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlab.layers.positions import positions_from_attention_mask, positions_in_segments

__all__ = ["AttentionMask", "may_attend", "positions_from_attention_mask", "positions_in_segments"]


def may_attend(q_pos: torch.Tensor, k_pos: torch.Tensor, *, q_valid: torch.Tensor | None = None,
               k_valid: torch.Tensor | None = None, causal: bool = True,
               window: int | None = None, q_seg: torch.Tensor | None = None,
               k_seg: torch.Tensor | None = None, sinks: int = 0) -> torch.Tensor:
    """The boolean mask ``(B, 1, Tq, Tk)`` from positions ``(B|1, Tq)``, ``(B|1, Tk)``, validity
    and (packed rows) segment ids."""
    qp = q_pos.unsqueeze(-1)            # (B|1, Tq, 1)
    kp = k_pos.unsqueeze(-2)            # (B|1, 1, Tk)
    allowed = torch.ones(torch.broadcast_shapes(qp.shape, kp.shape), dtype=torch.bool, device=q_pos.device)
    # Out of place: a validity mask may have a larger batch than the positions.
    if causal:
        allowed = allowed & (kp <= qp)
    if window is not None:
        in_window = (qp - kp) < window
        if sinks:
            in_window = in_window | (kp < sinks)
        allowed = allowed & in_window
    if q_valid is not None:
        allowed = allowed & q_valid.bool().unsqueeze(-1)
    if k_valid is not None:
        allowed = allowed & k_valid.bool().unsqueeze(-2)
    if q_seg is not None:
        allowed = allowed & (q_seg.unsqueeze(-1) == k_seg.unsqueeze(-2))
    return allowed.unsqueeze(1)


@dataclass
class AttentionMask:
    """Which keys each query may attend to, in the structured form described above.

    ``plain_causal`` marks the common case where queries and keys are the same unpadded
    sequence starting at 0 with no window: backends may then use their built-in causal path.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_valid: torch.Tensor | None = None
    k_valid: torch.Tensor | None = None
    causal: bool = True
    window: int | None = None
    sinks: int = 0                         # with a window: the first positions stay visible
    plain_causal: bool = False
    q_seg: torch.Tensor | None = None      # packed rows: segment id per query / key
    k_seg: torch.Tensor | None = None
    k_lengths: torch.Tensor | None = None  # (B,) keys per row when a cache knows them (decode kernels)
    _dense: torch.Tensor | None = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        """``(B, 1, Tq, Tk)`` booleans; computed once and shared by every layer of a forward."""
        if self._dense is None:
            self._dense = may_attend(self.q_pos, self.k_pos, q_valid=self.q_valid,
                                     k_valid=self.k_valid, causal=self.causal, window=self.window,
                                     q_seg=self.q_seg, k_seg=self.k_seg, sinks=self.sinks)
        return self._dense

    def row_has_keys(self) -> torch.Tensor:
        """``(B, 1, Tq, 1)``: False for queries that may attend to nothing (their output is 0)."""
        return self.dense().any(dim=-1, keepdim=True)

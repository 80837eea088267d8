"""Attention sinks at their places in the cache (StreamingLLM's positions, ``sink_positions="cache"``).

StreamingLLM keeps the first ``S`` tokens and the last ``W`` in its cache and gives every cached
token its *index in the cache* as position: sinks ``0..S-1``, the window ``S..S+W-1``, the newest
query last. For a window key the distance to the query is then what it always was; for sink ``j``
it is ``min(i, S + W - 1) - j`` instead of ``i - j``: the query sees every sink as if it stood at
position ``c = min(i, S + W - 1)``. So no rotary distance grows past ``S + W - 1``, and a model
trained with full attention on short texts can run with a window far past its training length.

The rule depends on the query only through ``c``, so it has a full-forward form as well as a
decode form, and they are the same computation (which the generic decode == forward tests check):

- one query per row (decoding): rotate the row's sink keys forward by ``i - c``; RoPE's scores
  depend only on the difference of the two rotations, so ``q(i)·k(j + i - c) = q(c)·k(j)``;
- several queries (training, prefill): widen each head to ``2D`` channels, ``[q(i), q(c)]`` against
  ``[k, 0]`` for the other keys and ``[0, k]`` for sinks — one ordinary attention call that every
  backend runs as it is, at twice the score work (the scale stays ``D ** -0.5``).
"""

from __future__ import annotations

import torch

from kvlab.layers.rope import apply_rope, rope_cos_sin


def sinks_at_cache_positions(q_unrotated: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor,
                             k_pos: torch.Tensor, *, sinks: int, window: int, inv_freq: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``(q, k)`` whose plain attention scores see each sink at its cache place.

    ``q_unrotated``/``q`` ``(B, Hq, T, D)`` before/after RoPE at ``q_pos (B|1, T)``; ``k`` ``(B, Hkv,
    Tk, D)`` rotated at its positions ``k_pos (B|1, Tk)`` (-1: an empty slot). Call attention with
    ``scale=D ** -0.5`` whatever width the returned tensors have.
    """
    last = sinks + window - 1                          # the query's place in a full cache
    is_sink = ((k_pos >= 0) & (k_pos < sinks))[:, None, :, None]        # (B|1, 1, Tk, 1)
    if q.shape[2] == 1:
        shift = (q_pos[:, -1:] - last).clamp_min(0)                      # (B|1, 1)
        cos, sin = rope_cos_sin(shift.expand(-1, k.shape[2]), inv_freq, k.dtype)
        return q, torch.where(is_sink, apply_rope(k, cos, sin), k)
    cos, sin = rope_cos_sin(q_pos.clamp_max(last), inv_freq, q.dtype)
    q_at_cache = apply_rope(q_unrotated, cos, sin)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    keys = torch.cat([torch.where(is_sink, zero, k), torch.where(is_sink, k, zero)], dim=-1)
    return torch.cat([q, q_at_cache], dim=-1), keys

"""What every backend checks and needs: the (B, heads, T, head_dim) layout and the group size."""

from __future__ import annotations

import torch

from kvlab.attention.masks import AttentionMask
from kvlab.errors import ConfigError


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate the layout and return the group size G.

    ``q (B, Hq, Tq, Dk)``, ``k (B, Hkv, Tk, Dk)``, ``v (B, Hkv, Tk, Dv)``: the value width may
    differ from the key width (MLA's absorbed decode); everything else must agree.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ConfigError(f"attention expects 4-D (B, heads, T, head_dim) tensors, got q{tuple(q.shape)} "
                          f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ConfigError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must have the same shape but for the last "
                          f"dimension (values may be narrower or wider than keys)")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ConfigError(f"q{tuple(q.shape)} and k{tuple(k.shape)} differ in batch or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ConfigError(f"n_head={q.shape[1]} is not divisible by n_kv_head={k.shape[1]}")
    return q.shape[1] // k.shape[1]


def positional_bias_needs_mask(mask, bias) -> str | None:
    """A position-defined bias reads the mask's positions: a call without a mask cannot have one."""
    if bias is not None and not isinstance(bias, torch.Tensor) and mask is None:
        return "a positional score bias needs an AttentionMask (its positions); pass one"
    return None


def prefix_lengths(mask: AttentionMask | None, batch: int, Tk: int) -> torch.Tensor | None:
    """Per-row key counts when each row may attend to exactly the keys ``[0, len)``, else None."""
    if mask is None:
        return torch.full((batch,), Tk, dtype=torch.int32)
    if (mask.k_lengths is not None and mask.window is None and mask.sparse is None and mask.q_valid is None
            and mask.causal):
        return mask.k_lengths.to(torch.int32)        # set by the cache: no device-to-host sync needed
    allowed = mask.dense()[:, 0, 0].expand(batch, Tk)                 # (B, Tk) for Tq = 1
    lengths = allowed.sum(-1)
    prefix = torch.arange(Tk, device=allowed.device).unsqueeze(0) < lengths.unsqueeze(1)
    return lengths.to(torch.int32) if bool((prefix == allowed).all()) else None

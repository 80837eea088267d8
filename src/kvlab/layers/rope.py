"""Rotary position embeddings in the half-split layout of HF Llama (``rotate_half``).

Angles are computed in float32 from integer positions for every forward pass, so each row of a
left-padded batch gets its own positions at no extra cost.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions (B, T)`` -> cos, sin of shape ``(B, 1, T, head_dim)`` for broadcasting over heads."""
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)   # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)                  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, H, T, D)``: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

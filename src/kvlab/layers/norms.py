"""Normalization layers: RMSNorm (HF Llama's float32 computation) and LayerNorm, by config."""

from __future__ import annotations

import torch
from torch import nn

from kvlab.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as HF Llama does (matters in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

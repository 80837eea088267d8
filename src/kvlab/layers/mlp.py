"""The feed-forward block: SwiGLU (Llama) or GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU (``down(silu(gate(x)) * up(x))``) or GELU (``down(gelu(up(x)))``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def input_projections(self) -> list[nn.Module]:
        """The projections of the MLP's input, in the order :meth:`forward`'s ``projected`` takes
        their outputs (a parallel block computes them in one matmul with attention's)."""
        return [self.gate_proj, self.up_proj] if self.swiglu else [self.up_proj]

    def forward(self, x: torch.Tensor, projected: list[torch.Tensor] | None = None) -> torch.Tensor:
        if projected is None:
            projected = [m(x) for m in self.input_projections()]
        if self.swiglu:
            gate, up = projected
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(projected[0]))

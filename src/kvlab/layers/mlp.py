"""The feed-forward block: SwiGLU (Llama), gated GELU (T5 v1.1), GELU (GPT-2) or ReLU (the original T5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.config import ModelConfig
from kvlab.config.model import GATED_MLPS


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")       # T5 v1.1's "gelu_new"


ACTIVATIONS = {"swiglu": F.silu, "geglu": _gelu_tanh, "gelu": F.gelu, "relu": F.relu}


class MLP(nn.Module):
    """Gated ``down(act(gate(x)) * up(x))`` (SwiGLU: SiLU, GeGLU: tanh GELU) or plain
    ``down(act(up(x)))`` (GELU, ReLU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp in GATED_MLPS
        self.act = ACTIVATIONS[cfg.mlp]
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def input_projections(self) -> list[nn.Module]:
        """The projections of the MLP's input, in the order :meth:`forward`'s ``projected`` takes
        their outputs (a parallel block computes them in one matmul with attention's)."""
        return [self.gate_proj, self.up_proj] if self.gated else [self.up_proj]

    def forward(self, x: torch.Tensor, projected: list[torch.Tensor] | None = None) -> torch.Tensor:
        if projected is None:
            projected = [m(x) for m in self.input_projections()]
        if self.gated:
            gate, up = projected
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(projected[0]))

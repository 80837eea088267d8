"""Layers every model is built from: norms, MLPs, positions (RoPE)."""

from kvlab.layers.mlp import MLP
from kvlab.layers.norms import RMSNorm, make_norm
from kvlab.layers.positions import positions_from_attention_mask, positions_in_segments
from kvlab.layers.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["MLP", "RMSNorm", "apply_rope", "make_norm", "positions_from_attention_mask", "positions_in_segments",
           "rope_cos_sin", "rope_inv_freq"]

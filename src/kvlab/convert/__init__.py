"""Conversion of trained models to smaller KV caches: K/V head pooling (GQA/MQA), cross-layer
sharing (CLA), multi-head latent attention (MLA) at any latent width, and low-rank key and value
latents (Palu) at any widths."""

from kvlab.convert.heads import METHODS, convert, plan_conversion, pool_kv_heads
from kvlab.convert.lowrank import convert_to_lowrank, plan_lowrank
from kvlab.convert.mla import MLA_METHODS, convert_to_mla, plan_mla

__all__ = ["METHODS", "MLA_METHODS", "convert", "convert_to_lowrank", "convert_to_mla", "plan_conversion",
           "plan_lowrank", "plan_mla", "pool_kv_heads"]

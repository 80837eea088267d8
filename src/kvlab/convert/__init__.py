"""Conversion of trained models to smaller KV caches: K/V head pooling (GQA/MQA), cross-layer
sharing (CLA), and multi-head latent attention (MLA) at any latent width."""

from kvlab.convert.heads import METHODS, convert, plan_conversion, pool_kv_heads
from kvlab.convert.mla import MLA_METHODS, convert_to_mla, plan_mla

__all__ = ["METHODS", "MLA_METHODS", "convert", "convert_to_mla", "plan_conversion", "plan_mla", "pool_kv_heads"]

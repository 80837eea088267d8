"""Conversion of trained models to smaller KV caches: K/V head pooling (GQA/MQA) and cross-layer
sharing (CLA)."""

from kvlab.convert.heads import METHODS, convert, plan_conversion, pool_kv_heads

__all__ = ["METHODS", "convert", "plan_conversion", "pool_kv_heads"]

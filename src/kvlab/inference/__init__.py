"""Inference: prefill + decode with the KV cache, sampling, stop tokens, streaming."""

from kvlab.inference.generation import generate

__all__ = ["generate"]

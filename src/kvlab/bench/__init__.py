"""Measurements that reports, benchmarks and the study share."""

from kvlab.bench.decode import DecodeSpeed, measure_decode

__all__ = ["DecodeSpeed", "measure_decode"]

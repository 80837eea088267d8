"""Evaluation and measurement: perplexity and bits per byte, the KV planner, decode benchmarks,
instruction-task accuracy."""

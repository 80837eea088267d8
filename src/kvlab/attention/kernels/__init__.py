"""Attention backends: reference (the float64-checked oracle), sdpa, flash (tiled, in PyTorch) and
triton (GPU kernels), interchangeable through :func:`attention`. Importing this package registers
them all; the Triton package itself is imported only when its kernels run."""

from kvlab.attention.kernels import flash, reference, sdpa, triton_backend  # noqa: F401  (registration)
from kvlab.attention.kernels.common import check_shapes
from kvlab.attention.kernels.dispatch import attention, auto_backend_name, resolve_backend

__all__ = ["attention", "auto_backend_name", "check_shapes", "resolve_backend"]

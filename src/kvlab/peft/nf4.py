"""QLoRA's base weights: 4-bit NormalFloat with double-quantized scales (Dettmers et al. 2023).

torchao's ``NF4Tensor`` does the quantization: blocks of 64 weights share an absmax scale, each
weight is the index of the nearest of the 16 NF4 levels (quantiles of a standard normal, scaled to
[-1, 1]), and the block scales are themselves quantized to int8 in blocks of 256 around their mean
("double quantization"). ``F.linear`` on an NF4 weight dequantizes it to its compute dtype (bf16,
or fp32 on CPUs without fast bf16) for the matmul, so nothing 16-bit is kept between calls.

The scales are double-quantized in groups of 256 blocks (the paper's choice) where the layer's
block count allows; torchao needs the group to divide the block count, so for other sizes
(SmolLM2's 576-wide projections have 5,184 blocks) the group is the largest power of two from 128
down to 8 that does — a few more fp32 group factors, 0.008 bits per weight at 64. A layer whose
size is not a multiple of 64 × 8 weights stays in the compute dtype, and :func:`weight_memory`
reports it as such.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kvlab.errors import ConfigError

BLOCK, SCALER_BLOCK = 64, 256
SMALLEST_SCALER_BLOCK = 8


def _to_nf4():
    # torchao logs a line for every optional GPU extension it cannot load, and its import makes
    # torch warn about a deprecated registration; on a CPU box that is noise.
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import to_nf4
    except ImportError as e:
        raise ConfigError(f"QLoRA needs torchao ({e}); pip install 'torchao>=0.18'") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return to_nf4


def is_quantized(weight: torch.Tensor) -> bool:
    """A 4-bit weight: torchao's NF4Tensor, possibly inside a Parameter (checked by type name, so
    that asking never imports torchao)."""
    return "NF4Tensor" in (type(weight).__name__, type(getattr(weight, "data", None)).__name__)


def nf4_codebook(t: torch.Tensor) -> torch.Tensor:
    """The 16 NF4 levels an NF4 tensor decodes with (the paper's Appendix E values)."""
    return t.nf4.float().clone()


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """An NF4 weight back in its compute dtype (for a merge, an export or a check)."""
    t = t.data if isinstance(t, nn.Parameter) else t
    return t.get_original_weight() if is_quantized(t) else t


def scaler_block_size(weight: torch.Tensor) -> int | None:
    """Blocks per double-quantization group: 256, else the largest power of two (≥ 8) dividing the
    block count; None when the weight cannot be stored as NF4."""
    if weight.dim() != 2 or weight.numel() % BLOCK:
        return None
    n_blocks = weight.numel() // BLOCK
    size = SCALER_BLOCK
    while size >= SMALLEST_SCALER_BLOCK:
        if n_blocks % size == 0:
            return size
        size //= 2
    return None


def default_compute_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 on GPUs and on CPUs with native bf16 matmuls (AVX-512 BF16 / AMX), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def quantize_linear_weights(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Store every transformer-block linear weight as NF4 (dequantizing to ``compute_dtype``); the
    embeddings, norms and LM head stay in ``compute_dtype``, as in QLoRA. Returns the quantized
    layers' names; all base parameters end up frozen."""
    to_nf4 = _to_nf4()
    model.to(compute_dtype)
    done = []
    for name, module in model.named_modules():
        group = scaler_block_size(module.weight) if isinstance(module, nn.Linear) else None
        if group is not None and name.startswith("layers."):
            q = to_nf4(module.weight.detach().to(compute_dtype), BLOCK, group)
            module.weight = nn.Parameter(q, requires_grad=False)
            done.append(name)
    if not done:
        raise ConfigError(f"no linear layer of this model has a size divisible by {BLOCK * SMALLEST_SCALER_BLOCK} "
                          f"weights ({BLOCK}-weight blocks in scale groups of at least {SMALLEST_SCALER_BLOCK}), so "
                          f"nothing can be stored as NF4; use LoRA instead of QLoRA")
    for p in model.parameters():
        p.requires_grad_(False)
    return done


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage of a tensor; for NF4, its 4-bit codes, int8 scales, their scale factors and mean."""
    t = t.data if isinstance(t, nn.Parameter) else t
    if is_quantized(t):
        parts = (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean)
        return sum(p.numel() * p.element_size() for p in parts)
    return t.numel() * t.element_size()


def weight_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the transformer-block linear weights now and what they would take in bf16."""
    now = bf16 = n_quantized = n_linear = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            now += tensor_bytes(module.weight)
            bf16 += module.weight.numel() * 2
            n_linear += 1
            n_quantized += is_quantized(module.weight)
    return {"linear_weight_bytes": now, "linear_weight_bytes_bf16": bf16, "quantized_layers": n_quantized,
            "linear_layers": n_linear}

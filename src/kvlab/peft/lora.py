"""LoRA (Hu et al. 2021): ``y = x Wᵀ + b + s · B A x`` with ``A (r × in)``, ``B (out × r)``, ``s = α / r``
(``α / √r`` with rsLoRA). ``B`` starts at zero, so an adapted model starts equal to its base.

A :class:`LoraLinear` *is* the ``nn.Linear`` it adapts — it takes over the base's ``weight`` and
``bias`` parameters under the same names and adds ``lora_A``/``lora_B`` — so a LoRA model's
state dict keeps every base name (checkpoints, HF export and conversion keep working) and the
adapter is exactly the ``lora_*`` entries. The base weight may be a quantized tensor
(:mod:`kvlab.peft.nf4`, QLoRA); it is then frozen and never merged.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.config.model import GATED_MLPS
from kvlab.errors import ConfigError
from kvlab.peft.nf4 import is_quantized

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_TARGETS = (*ATTENTION_TARGETS, "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names or patterns: a bare name ("q_proj") matches that leaf in every layer; a
    # pattern with "." or "*" is a regular expression over the full name ("layers\.[0-3]\..*v_proj").
    target_modules: tuple[str, ...] = ATTENTION_TARGETS
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (list, tuple)) or not all(
                isinstance(t, str) for t in self.target_modules):
            raise ConfigError(f"LoRA target_modules={self.target_modules!r} must be a list of module names, e.g. "
                              f"[\"q_proj\", \"v_proj\"]")
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA r={self.r!r} must be a positive integer (typical: 4-64)")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha={self.alpha!r} must be positive (typical: 2·r)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("LoRA target_modules is empty; name at least one linear layer, e.g. q_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def matches(name: str, targets: tuple[str, ...]) -> bool:
    for t in targets:
        if "." in t or "*" in t or "[" in t:
            if re.fullmatch(t, name):
                return True
        elif name.rsplit(".", 1)[-1] == t:
            return True
    return False


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight``/``bias``) plus a low-rank update."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        # Adapters train in the base's compute dtype (an NF4 weight reports the dtype it dequantizes to).
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))     # as nn.Linear (and PEFT) initialise A
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.merged = False
        self.disabled = False        # the base alone (a DPO/GRPO reference: kvlab.training.preference)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The tensors the adapter adds, by leaf name: every parameter of the layer's own but the
        ``weight`` and ``bias`` it took over from the base (``lora_A``/``lora_B``; AdaLoRA's
        ``lora_E`` too). They are the adapter's state dict and what an adapter trains."""
        return {n: p for n, p in self.named_parameters(recurse=False) if n not in ("weight", "bias")}

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` with the update ``s · B A``; AdaLoRA overrides it (``A`` scaled by ``Λ``)."""
        return self.lora_A, self.lora_B, self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` (out × in), computed in float32."""
        a, b, s = self.low_rank()
        return (b.float() @ a.float()) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        a, b, s = self.low_rank()
        return y + F.linear(F.linear(self.dropout(x), a.to(x.dtype)), b.to(x.dtype)) * s

    def merge(self) -> None:
        if self.merged:
            return
        _check_mergeable(self)
        with torch.no_grad():
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False


def _check_mergeable(layer: LoraLinear) -> None:
    if is_quantized(layer.weight):
        raise ConfigError("cannot merge LoRA into a 4-bit base weight; save the adapter on its own, or "
                          "load the base in bf16/fp32 and merge there")


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, cfg: LoraConfig, layer_class: type | None = None) -> list[str]:
    """Replace every linear layer matching ``cfg.target_modules`` by a :class:`LoraLinear` (or
    ``layer_class``, e.g. AdaLoRA's), freeze everything else, and return the adapted names. The
    model keeps ``model.lora_config``."""
    layer_class = layer_class or LoraLinear
    if lora_layers(model):
        raise ConfigError("the model already has LoRA layers; merge_and_unload() or load a fresh model first")
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    chosen = [name for name in linears if matches(name, cfg.target_modules)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(f"LoRA target_modules={list(cfg.target_modules)} match no linear layer of this model; "
                          f"its linear layers are named {leaves}")
    if "lm_head" in chosen and getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        raise ConfigError("lm_head shares its weight with the input embeddings in this model (tied); merging a "
                          "LoRA into it would change the embeddings too. Leave lm_head out of target_modules")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, layer_class(linears[name], cfg))
    model.lora_config = cfg
    return chosen


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` layers back."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
    for attr in ("lora_config", "adalora_config"):      # the adapter is gone
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "adapter_spec"):
        model.adapter_spec = None
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone: every layer's :meth:`~LoraLinear.adapter_parameters` (``lora_*``), under
    the model's own names."""
    return {f"{name}.{leaf}": p.detach() for name, layer in lora_layers(model).items()
            for leaf, p in layer.adapter_parameters().items()}


def adapted_shapes(model_cfg, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear layer of ``model_cfg`` that ``targets`` select, from the
    config alone (an independent count: K/V projections exist only in KV-producing layers)."""
    d, q, kv, ff = model_cfg.d_model, model_cfg.n_head * model_cfg.head_dim, \
        model_cfg.n_kv_head * model_cfg.head_dim, model_cfg.d_ff
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "up_proj": (d, ff), "down_proj": (ff, d)}
    if model_cfg.mlp in GATED_MLPS:
        shapes["gate_proj"] = (d, ff)
    found = []
    for layer in range(model_cfg.n_layer):
        producer = model_cfg.kv_sources[layer] == layer
        for leaf, (i, o) in shapes.items():
            if leaf in ("k_proj", "v_proj") and not producer:
                continue
            prefix = "self_attn" if leaf in ATTENTION_TARGETS else "mlp"
            if matches(f"layers.{layer}.{prefix}.{leaf}", targets):
                found.append((i, o))
    if matches("lm_head", targets):
        found.append((d, model_cfg.vocab_size))
    return found


def lora_parameter_count(model_cfg, cfg: LoraConfig) -> int:
    """Closed form: ``r · (in + out)`` for every targeted linear layer of ``model_cfg``."""
    return sum(cfg.r * (i + o) for i, o in adapted_shapes(model_cfg, cfg.target_modules))

"""One entry point for every method: attach an adapter, count it, save it, load it, export it.

An adapter directory holds ``kvlab_adapter.json`` (the method, its settings and the base model's
attention shape) and ``adapter.safetensors`` (the trained tensors under the model's own parameter
names). LoRA-family adapters can also be written in HF PEFT's layout (:func:`export_peft`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvlab.errors import CheckpointError, ConfigError
from kvlab.peft.adalora import AdaLoraConfig, RankAllocator, adalora_parameter_count, apply_adalora
from kvlab.peft.lora import LoraConfig, apply_lora, lora_layers, lora_parameter_count, lora_state_dict
from kvlab.peft.prefix import PREFIX_METHODS, PromptConfig, add_prompt_adapter, prompt_parameter_count

METHODS = ("lora", "qlora", "adalora", "prefix", "ptuning", "prompt")
LORA_FAMILY = ("lora", "qlora", "adalora")
MERGEABLE = ("lora", "adalora")        # folded into full-precision base weights (QLoRA's base is 4-bit)
CONFIG_FILE, WEIGHTS_FILE = "kvlab_adapter.json", "adapter.safetensors"
# What must match between the model an adapter was trained on and the one it is loaded onto.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ff", "kv_sources")


@dataclass
class AdapterSpec:
    """A method and its settings (the fields of its config class)."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {list(METHODS)}")
        _ = self.config  # validates the options

    @property
    def mergeable(self) -> bool:
        """Whether the adapter folds into the base weights (``merge_and_unload``)."""
        return self.method in MERGEABLE

    @property
    def config(self) -> LoraConfig | AdaLoraConfig | PromptConfig:
        try:
            if self.method in ("lora", "qlora"):
                return LoraConfig(**self.options)
            if self.method == "adalora":
                return AdaLoraConfig(**self.options)
            return PromptConfig(method=self.method, **self.options)
        except TypeError as e:     # an option the method does not have
            raise ConfigError(f"{self.method}: {e}") from None


@dataclass
class Attached:
    """What :func:`attach` did: the spec, and the per-step hooks the training loop must call
    (AdaLoRA's rank allocator; None for the other methods)."""

    spec: AdapterSpec
    allocator: RankAllocator | None = None
    memory: dict[str, int] | None = None       # QLoRA: base weight bytes before/after


def attach(model: nn.Module, spec: AdapterSpec, *, compute_dtype: torch.dtype | None = None) -> Attached:
    """Add ``spec``'s adapter to ``model`` and freeze everything else."""
    if getattr(model, "adapter_spec", None) is not None:
        raise ConfigError(f"the model already has a {model.adapter_spec.method} adapter; load a fresh model first")
    cfg = spec.config
    attached = Attached(spec)
    if spec.method == "qlora":
        from kvlab.peft.nf4 import default_compute_dtype, quantize_linear_weights, weight_memory

        before = weight_memory(model)
        quantize_linear_weights(model, compute_dtype or default_compute_dtype(model.device))
        after = weight_memory(model)
        attached.memory = {"bf16_bytes": before["linear_weight_bytes_bf16"], "nf4_bytes": after["linear_weight_bytes"],
                           "quantized_layers": after["quantized_layers"], "linear_layers": after["linear_layers"]}
        apply_lora(model, cfg)
    elif spec.method == "lora":
        apply_lora(model, cfg)
    elif spec.method == "adalora":
        attached.allocator = apply_adalora(model, cfg)
    else:
        add_prompt_adapter(model, cfg)
    model.adapter_spec = spec
    return attached


def parameter_count(model_cfg, spec: AdapterSpec) -> int:
    """The closed-form number of trainable parameters of ``spec`` on a model of ``model_cfg``."""
    cfg = spec.config
    if spec.method in ("lora", "qlora"):
        return lora_parameter_count(model_cfg, cfg)
    if spec.method == "adalora":
        return adalora_parameter_count(model_cfg, cfg)
    return prompt_parameter_count(model_cfg, cfg)


def adapter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """What adapters added to ``model``, as parameter groups beside the model's own
    (:meth:`~kvlab.models.decoder.Transformer.parameter_groups`): ``adapter``, the tensors an
    adapter trains — the LoRA family's factors inside the layers they adapt
    (:meth:`~kvlab.peft.lora.LoraLinear.adapter_parameters`) and a prompt adapter's tensors — and
    ``adapter_fixed``, those it keeps as they are: a merged prefix, which
    :meth:`~kvlab.peft.prefix.PrefixAdapter.merge` makes frozen and nothing makes trainable again."""
    trained = [p for layer in lora_layers(model).values() for p in layer.adapter_parameters().values()]
    fixed = []
    prompt = getattr(model, "prompt_adapter", None)
    if prompt is not None:
        for p in prompt.parameters():
            (trained if p.requires_grad else fixed).append(p)
    return {"adapter": trained, "adapter_fixed": fixed}


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter's trainable parameters, by name, and those of a score head (a reward model's
    new head trains with the adapter and is saved with it: PEFT's ``modules_to_save``)."""
    groups = adapter_groups(model)
    ours = {id(p) for p in groups["adapter"] + groups["adapter_fixed"]}
    if hasattr(model, "score"):
        ours |= {id(p) for p in model.score.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ours and p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    spec = getattr(model, "adapter_spec", None)
    if spec is None:
        raise ConfigError("the model has no adapter to save; attach one with kvlab.peft.attach")
    head = {f"score.{k}": v.detach() for k, v in model.score.state_dict().items()} if hasattr(model, "score") else {}
    if spec.method in LORA_FAMILY:
        return lora_state_dict(model) | head
    return {f"prompt_adapter.{k}": v.detach() for k, v in model.prompt_adapter.state_dict().items()} | head


def merge_prompt_reparameterization(model: nn.Module) -> None:
    """Prefix tuning: replace the reparameterisation MLP by the prefixes it computes."""
    if getattr(model, "prompt_adapter", None) is not None:
        model.prompt_adapter.merge()


def _shape(model_cfg) -> dict:
    return {f: getattr(model_cfg, f) for f in SHAPE_FIELDS}


def save_adapter(model: nn.Module, directory: str | Path, *, extra=None, overwrite: bool = False) -> Path:
    """Write the adapter alone (atomically: a temporary directory renamed into place);
    ``extra(tmpdir)`` may add files inside the same atomic write (a trainer state)."""
    from safetensors.torch import save_file

    from kvlab.io.atomic import write_dir_atomically

    spec = model.adapter_spec
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"format": "kvlab-adapter", "version": 1, "method": spec.method, "options": spec.config.to_dict(),
            "base_shape": _shape(model.cfg), "base_name": getattr(model.cfg, "name", None),
            "base_signature": base_signature(model),
            "parameters": int(sum(v.numel() for v in tensors.values())),
            "prefix_merged": spec.method == "prefix" and not model.prompt_adapter.reparameterized,
            "score_outputs": model.cfg.score_outputs}
    if spec.method in PREFIX_METHODS:
        meta["options"].pop("method", None)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if extra is not None:
            extra(tmp)

    return write_dir_atomically(Path(directory), write, kind="kvlab-adapter", overwrite=overwrite)


def base_signature(model: nn.Module) -> list[list[float]]:
    """A few input-embedding values of the base model: an adapter remembers them, so that it is not
    applied to another model that merely has the same shapes (embeddings are never quantized or
    adapted, and survive a bf16 load within the tolerance of :func:`load_adapter`)."""
    emb = model.embed_tokens.weight.detach()
    rows = sorted({0, emb.shape[0] // 3, 2 * emb.shape[0] // 3, emb.shape[0] - 1})
    return [[float(x) for x in emb[r, :8].float().cpu()] for r in rows]


def read_adapter_config(directory: str | Path) -> dict:
    if not Path(directory).is_dir():
        state = "is a file, not a directory" if Path(directory).exists() else "does not exist"
        raise CheckpointError(f"adapter {str(directory)!r} {state} (give the OUT/adapter directory that kvlab "
                              f"finetune wrote)")
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        hint = (" (this is a PEFT adapter; kvlab loads its own adapter directories)"
                if (Path(directory) / "adapter_config.json").is_file() else "")
        raise CheckpointError(f"{directory} is not a kvlab adapter: {CONFIG_FILE} is missing{hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in ("format", "method", "options", "base_shape") if not isinstance(meta, dict) or k not in meta]
    if missing or meta.get("format") != "kvlab-adapter":
        raise CheckpointError(f"{path} is not a kvlab adapter config" + (f" (it lacks {', '.join(missing)})"
                                                                        if missing else ""))
    return meta


def load_adapter(model: nn.Module, directory: str | Path, *, compute_dtype: torch.dtype | None = None) -> Attached:
    """Attach the adapter saved in ``directory`` to ``model`` (its base) with the saved tensors."""
    meta = read_adapter_config(directory)
    want, have = meta["base_shape"], _shape(model.cfg)
    diff = [f"{k}: adapter {want.get(k)!r} vs model {have[k]!r}" for k in SHAPE_FIELDS if want.get(k) != have[k]]
    if diff:
        raise CheckpointError(f"the adapter in {directory} was trained on a different model shape ({'; '.join(diff)}); "
                              f"load it onto its base model ({meta.get('base_name')})")
    saved = meta.get("base_signature")
    if saved is not None and not torch.allclose(torch.tensor(saved), torch.tensor(base_signature(model)),
                                                rtol=2e-2, atol=2e-3):
        raise CheckpointError(f"the adapter in {directory} was trained on another model of the same shape (the input "
                              f"embeddings differ); load it onto its base model ({meta.get('base_name')})")
    spec = AdapterSpec(meta["method"], meta["options"])
    if meta.get("score_outputs"):          # a reward model's adapter carries its score head
        from kvlab.models.heads import add_score_head

        add_score_head(model, meta["score_outputs"])
    attached = attach(model, spec, compute_dtype=compute_dtype)
    if meta.get("prefix_merged"):
        merge_prompt_reparameterization(model)
    load_adapter_weights(model, directory)
    return attached


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy the tensors of an adapter directory into the (already attached) adapter of ``model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(Path(directory) / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{Path(directory) / WEIGHTS_FILE} cannot be read ({e}); the file is missing, corrupt "
                              f"or truncated") from None
    expected = adapter_state_dict(model)
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise CheckpointError(f"{directory}/{WEIGHTS_FILE} does not fit this adapter: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].dtype))


# ------------------------------------------------------------------------------ PEFT export
def export_peft(model: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None,
                overwrite: bool = False) -> Path:
    """Write a LoRA-family adapter as HF PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``
    for the HF export of the base model (kvlab names are HF Llama's without ``model.``).
    AdaLoRA goes out as plain LoRA: ``A ⊙ E`` as ``lora_A`` (pruned ranks are zero rows)."""
    from safetensors.torch import save_file

    from kvlab.io.atomic import write_dir_atomically

    spec = getattr(model, "adapter_spec", None)
    if spec is None or spec.method not in LORA_FAMILY:
        raise ConfigError(f"PEFT export covers LoRA, QLoRA and AdaLoRA adapters; this model has "
                          f"{spec.method if spec else 'no adapter'}")
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ConfigError("the adapter is merged into the base weights; unmerge it before exporting it alone")
    tensors, targets, r, scaling = {}, [], None, None
    for name, layer in layers.items():
        a, b, s = layer.low_rank()
        hf = name if name == "lm_head" else f"model.{name}"
        tensors[f"base_model.model.{hf}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{hf}.lora_B.weight"] = b.detach().float().contiguous().cpu()
        targets.append(hf)
        r, scaling = a.shape[0], s
    cfg = spec.config
    lora_cfg = cfg.lora if spec.method == "adalora" else cfg
    rslora = lora_cfg.rslora
    # PEFT's scaling is lora_alpha / r (or / sqrt(r) with rsLoRA): choose lora_alpha to give ours.
    alpha = scaling * (r ** 0.5 if rslora else r)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "lora_dropout": lora_cfg.dropout, "use_rslora": rslora, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(targets), "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    return write_dir_atomically(Path(directory), write, kind="peft-adapter", overwrite=overwrite)

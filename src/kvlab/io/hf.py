"""HF transformers checkpoints: import Llama / Mistral / Qwen2 directories, export Llama (or Qwen2).

kvlab's parameter names are HF Llama's without the ``model.`` prefix, and its RoPE uses the same
half-split layout, so weights map one to one; only the configs need translating.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvlab.config.model import ModelConfig
from kvlab.errors import CheckpointError, ConfigError
from kvlab.io.atomic import write_dir_atomically
from kvlab.io.provenance import new_provenance
from kvlab.io.tokenizer import load_tokenizer
from kvlab.io.weights import build_model, refuse_adapter
from kvlab.models.decoder import Transformer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{where}: RoPE scaling type {rope_type!r} is not supported yet; kvlab implements "
                              f"plain RoPE (rope_type 'default')")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Translate a HF Llama-family ``config.json`` dict into a :class:`ModelConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; kvlab imports "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Llama-family "
                              f"models use 'silu' in a SwiGLU MLP)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    n_head = hf["num_attention_heads"]
    attn_bias = bool(hf.get("attention_bias", False))
    qkv_bias = True if model_type == "qwen2" else attn_bias
    window = None
    if model_type == "mistral" and hf.get("sliding_window"):
        window = int(hf["sliding_window"])
    if model_type == "qwen2" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise CheckpointError(f"{where}: Qwen2 sliding windows on some layers only are not supported")

    def first(v):
        return v[0] if isinstance(v, list) else v

    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
            n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, mlp="swiglu",
            d_ff=hf["intermediate_size"], norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            pos="rope", rope_theta=_rope_theta(hf, where), block="sequential",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
            o_bias=attn_bias and model_type != "qwen2", sliding_window=window,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            bos_token_id=first(hf.get("bos_token_id")), eos_token_id=first(hf.get("eos_token_id")),
            pad_token_id=first(hf.get("pad_token_id")), name=hf.get("_name_or_path") or None)
    except KeyError as e:
        raise CheckpointError(f"{where}: required field {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A HF config for ``cfg``: LlamaForCausalLM, or Qwen2ForCausalLM when only q/k/v have biases."""
    problems = []
    if cfg.attention_layers is not None or cfg.attn_kind != "gqa":
        problems.append(f"per-layer attention specs / the {cfg.attn_kind!r} kind (Llama, Mistral and Qwen2 have one "
                        f"softmax attention for every layer)")
    if cfg.n_kv_layers != cfg.n_layer:
        problems.append("Cross-Layer Attention (HF transformers has no architecture that shares KV across "
                        "layers; keep this model in the kvlab format: kvlab.save(model, dir) / "
                        "kvlab export --format kvlab)")
    for bad, what in ((cfg.pos != "rope", "learned positions"), (cfg.block != "sequential", "parallel blocks"),
                      (cfg.mlp != "swiglu", "a GELU MLP"), (cfg.norm != "rmsnorm", "LayerNorm"),
                      (cfg.o_bias and not cfg.qkv_bias, "an o_proj bias without q/k/v biases")):
        if bad:
            problems.append(f"{what} (Llama uses RoPE, sequential blocks, SwiGLU and RMSNorm)")
    if problems:
        raise ConfigError("cannot export to HF: " + "; ".join(problems))
    qwen2 = cfg.qkv_bias and not cfg.o_bias
    if qwen2 and cfg.sliding_window is not None:
        raise ConfigError("cannot export to HF: q/k/v biases together with a sliding window have no HF architecture")
    model_type = "qwen2" if qwen2 else "mistral" if cfg.sliding_window is not None else "llama"
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    hf: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "llama":
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = False
    if model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if model_type == "qwen2":
        hf["use_sliding_window"] = False
    return hf


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif single.is_file():
        files = ["model.safetensors"]
    else:
        if list(directory.glob("*.bin")):
            raise CheckpointError(f"{directory} holds PyTorch .bin weights; kvlab reads safetensors only "
                                  f"(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise CheckpointError(f"{directory}: neither model.safetensors nor model.safetensors.index.json exists")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in model.safetensors.index.json but missing")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} cannot be read ({e}); the file is corrupt or truncated") from None
    return state


def import_hf(directory: str | Path, *, dtype: torch.dtype | None = torch.float32,
              device: str | torch.device = "cpu") -> Transformer:
    """Load a HF Llama/Mistral/Qwen2 checkpoint directory (single or sharded safetensors)."""
    directory = Path(directory)
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()), str(directory / "config.json"))
    raw = _read_hf_weights(directory)
    state = {}
    for name, tensor in raw.items():
        if name.endswith("rotary_emb.inv_freq"):        # a buffer some old checkpoints saved
            continue
        state[name.removeprefix("model.")] = tensor
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = build_model(cfg, state, where=str(directory), device=device, dtype=dtype)
    model.tokenizer = load_tokenizer(directory)
    model.provenance = new_provenance("hf", path=str(directory.resolve()),
                                      model_type=json.loads((directory / "config.json").read_text())["model_type"])
    return model


def export_hf(model: Transformer, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a HF checkpoint directory that ``transformers`` loads as it is."""
    refuse_adapter(model)
    dtype = dtype or model.dtype
    hf_config = config_to_hf(model.cfg, dtype)
    state = {}
    for name, tensor in model.state_dict().items():
        if model.cfg.tie_embeddings and name == "lm_head.weight":
            continue
        key = name if name.startswith("lm_head.") else f"model.{name}"
        state[key] = tensor.detach().to(dtype).contiguous().cpu()
    tokenizer = model.tokenizer

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id,
             "pad_token_id": model.cfg.pad_token_id}, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None and getattr(tokenizer, "kind", None) == "hf":
            tokenizer.save(tmp)

    return write_dir_atomically(directory, fill)

"""HF transformers checkpoints: import Llama / Mistral / Qwen2 / dense DeepSeek-V3 (MLA) / MPT (ALiBi)
directories, export Llama (or Mistral, Qwen2), for ``mla`` models DeepSeek-V3, and for ALiBi models
MPT (:mod:`kvlab.io.mpt`).

A model with a score head (a reward model, :func:`kvlab.models.heads.add_score_head`) is
``*ForSequenceClassification`` there, both ways: the head is ``score.weight``, ``num_labels`` its
outputs, and transformers reads it at the rightmost token that is not ``pad_token_id`` — the rule
kvlab's :meth:`~kvlab.models.decoder.Transformer.sequence_scores` keeps, so both score alike. A
sequence classifier has no LM head: an untied one is not exported, and one imported comes back zero.

kvlab's parameter names are HF Llama's (and for MLA DeepseekV3Attention's) without the ``model.``
prefix, and its RoPE uses the same half-split layout, so weights map one to one; only the configs
need translating, and DeepSeek's interleaved RoPE channels a permutation (:func:`_deinterleave_rope`).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvlab.attention.mla import MLAShape
from kvlab.config.model import ModelConfig
from kvlab.errors import CheckpointError, ConfigError
from kvlab.io.atomic import write_dir_atomically
from kvlab.io.mpt import config_from_mpt, config_to_mpt, mpt_problems, state_from_mpt, state_to_mpt
from kvlab.io.provenance import new_provenance
from kvlab.io.t5 import config_from_t5, config_to_t5, expanded_kv, needs_expansion, state_from_t5, state_to_t5
from kvlab.io.tokenizer import load_tokenizer
from kvlab.io.weights import build_model, refuse_adapter, without_key_balance
from kvlab.models.decoder import Transformer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "deepseek_v3", "mpt", "t5")


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


def is_sequence_classifier(hf: dict[str, Any]) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or ())


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Translate a HF Llama-family ``config.json`` dict into a :class:`ModelConfig` (with a score
    head of ``num_labels`` outputs for a ``*ForSequenceClassification``)."""
    cfg = _lm_config_from_hf(hf, where)
    if is_sequence_classifier(hf):
        labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2      # transformers' default: 2
        cfg = cfg.replace(score_outputs=int(labels))
    return cfg


def _lm_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; kvlab imports "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
    if model_type == "mpt":
        return config_from_mpt(hf, where)
    if model_type == "t5":
        return config_from_t5(hf, where)
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Llama-family "
                              f"models use 'silu' in a SwiGLU MLP)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if not isinstance(hf.get(k), int)]
    if missing:
        raise CheckpointError(f"{where}: the {model_type} config lacks {', '.join(missing)} (or they are not "
                              f"integers); it is incomplete")
    if model_type == "deepseek_v3":
        return _config_from_deepseek(hf, where)
    n_head = hf["num_attention_heads"]
    attn_bias = bool(hf.get("attention_bias", False))
    qkv_bias = True if model_type == "qwen2" else attn_bias
    window = None
    if model_type == "mistral" and hf.get("sliding_window"):
        window = int(hf["sliding_window"])
    if model_type == "qwen2" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise CheckpointError(f"{where}: Qwen2 sliding windows on some layers only are not supported")

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
            bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=_first(hf.get("pad_token_id")), name=hf.get("_name_or_path") or None)
    except KeyError as e:
        raise CheckpointError(f"{where}: required field {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _first(v):
    return v[0] if isinstance(v, list) else v


def _config_from_deepseek(hf: dict[str, Any], where: str) -> ModelConfig:
    """A dense DeepSeek-V3 (every layer's MLP dense, ``first_k_dense_replace >= num_hidden_layers``)."""
    try:
        n_layer = hf["num_hidden_layers"]
        dense = hf.get("first_k_dense_replace", 3)
        if dense is None or dense < n_layer:
            raise CheckpointError(f"{where}: layers {dense or 0}..{n_layer - 1} are mixture-of-experts layers, which "
                                  f"kvlab does not implement; it imports dense DeepSeek-V3 models "
                                  f"(first_k_dense_replace >= num_hidden_layers)")
        nope, rope = hf.get("qk_nope_head_dim", 128), hf.get("qk_rope_head_dim", 64)
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=n_layer,
            n_head=hf["num_attention_heads"], n_kv_head=hf["num_attention_heads"], head_dim=nope + rope,
            mlp="swiglu", d_ff=hf["intermediate_size"], norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            pos="rope", rope_theta=_rope_theta(hf, where), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bias, o_bias=bias, max_seq_len=hf.get("max_position_embeddings", 4096), attn_kind="mla",
            attn_options=MLAShape(kv_lora_rank=hf.get("kv_lora_rank", 512), q_lora_rank=hf.get("q_lora_rank"),
                                  qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=hf.get("v_head_dim") or 128,
                                  latent_norm=True).options(),
            bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=_first(hf.get("pad_token_id")), name=hf.get("_name_or_path") or None)
    except KeyError as e:
        raise CheckpointError(f"{where}: required field {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _rope_rows(cfg: ModelConfig, name: str) -> torch.Tensor | None:
    """The output rows of an MLA projection that carry RoPE channels (None for other tensors)."""
    m = MLAShape.of(cfg)
    qk, rope = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_rope_head_dim
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.q_b_proj.weight")):
        return torch.arange(cfg.n_head).unsqueeze(1) * qk + m.qk_nope_head_dim + torch.arange(rope)
    if name.endswith(("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.bias")):
        return (m.kv_lora_rank + torch.arange(rope)).unsqueeze(0)
    return None


def _deinterleave_rope(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """DeepSeek's ``rope_interleave``: its RoPE channels are pairs (x0, x1), (x2, x3)...; kvlab rotates
    halves (x_i, x_{i+R/2}). Reordering each RoPE block's output rows to evens-then-odds turns one
    into the other, for queries and the shared key alike, so every score is unchanged."""
    rope = MLAShape.of(cfg).qk_rope_head_dim
    order = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    for name, tensor in state.items():
        rows = _rope_rows(cfg, name)
        if rows is not None:
            tensor = tensor.clone()
            tensor[rows.reshape(-1)] = tensor[rows[:, order].reshape(-1)]
            state[name] = tensor


def _deepseek_problems(cfg: ModelConfig, model: Transformer | None) -> list[str]:
    problems = []
    if cfg.n_kv_layers != cfg.n_layer:
        problems.append("cross-layer latent sharing (DeepSeek-V3 gives every layer its own latent)")
    if cfg.sliding_window is not None:
        problems.append("a sliding window (DeepSeek-V3 attends to the whole context)")
    if cfg.qkv_bias != cfg.o_bias:
        problems.append("q/kv biases without an o_proj bias or the reverse (DeepSeek-V3's attention_bias sets both)")
    if model is not None and cfg.qkv_bias and MLAShape.of(cfg).q_lora_rank is None:
        bias = model.layers[0].self_attn.q_proj.bias
        if any(b.self_attn.q_proj.bias.detach().abs().max() > 0 for b in model.layers):
            problems.append(f"a q_proj bias (DeepSeek-V3's q_proj has none; got {tuple(bias.shape)} nonzero)")
    return problems


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype, model: Transformer | None = None) -> dict[str, Any]:
    """A HF config for ``cfg``: LlamaForCausalLM, or Qwen2ForCausalLM when only q/k/v have biases,
    MistralForCausalLM with a window, DeepseekV3ForCausalLM for MLA, MptForCausalLM for ALiBi — and
    ``*ForSequenceClassification`` instead for a model with a score head."""
    hf = _lm_config_to_hf(cfg, dtype, model)
    if cfg.score_outputs:
        hf["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification") for a in hf["architectures"]]
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.score_outputs)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.score_outputs)}
        hf["pad_token_id"] = cfg.pad_token_id       # where transformers stops reading (see the module docstring)
    return hf


def _lm_config_to_hf(cfg: ModelConfig, dtype: torch.dtype, model: Transformer | None) -> dict[str, Any]:
    if cfg.is_encoder_decoder:              # T5ForConditionalGeneration (kvlab.io.t5)
        return config_to_t5(cfg, dtype)
    if cfg.pos == "alibi":                  # MPT: the ALiBi architecture of transformers that kvlab's matches
        problems = mpt_problems(cfg, model)
        if problems:
            raise ConfigError("cannot export an ALiBi model to HF (as MPT): " + "; ".join(problems))
        return config_to_mpt(cfg, dtype)
    problems = []
    deepseek = cfg.attention_layers is None and cfg.attn_kind == "mla"
    if deepseek:
        problems += _deepseek_problems(cfg, model)
    elif cfg.attention_layers is not None or cfg.attn_kind != "gqa":
        problems.append(f"per-layer attention specs / the {cfg.attn_kind!r} kind (Llama, Mistral and Qwen2 have one "
                        f"softmax attention for every layer; DeepSeek-V3 MLA in every layer)")
    elif cfg.n_kv_layers != cfg.n_layer:
        problems.append("Cross-Layer Attention (HF transformers has no architecture that shares KV across "
                        "layers; keep this model in the kvlab format: kvlab.save(model, dir) / "
                        "kvlab export --format kvlab)")
    for bad, what in ((cfg.pos != "rope", f"{cfg.pos} positions"), (cfg.block != "sequential", "parallel blocks"),
                      (cfg.mlp != "swiglu", f"a {cfg.mlp} MLP"), (cfg.norm != "rmsnorm", "LayerNorm"),
                      (cfg.o_bias and not cfg.qkv_bias, "an o_proj bias without q/k/v biases")):
        if bad:
            problems.append(f"{what} (Llama uses RoPE, sequential blocks, SwiGLU and RMSNorm)")
    if cfg.block_sparse is not None:
        problems.append("a block-sparse layout (HF's Llama-family attention is dense; keep the model in the kvlab "
                        "format)")
    if cfg.attention_sinks and cfg.sliding_window is not None:
        problems.append("attention sinks (Mistral's sliding window has none; keep the model in the kvlab format)")
    if problems:
        raise ConfigError("cannot export to HF: " + "; ".join(problems))
    if deepseek:
        return _deepseek_config(cfg, dtype)
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


def _deepseek_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    name, m = str(dtype).removeprefix("torch."), MLAShape.of(cfg)
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        # Every layer dense: the MoE fields below are never used but must be valid.
        "first_k_dense_replace": cfg.n_layer, "moe_intermediate_size": cfg.d_ff, "n_routed_experts": 1,
        "n_shared_experts": 1, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head, "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank, "qk_rope_head_dim": m.qk_rope_head_dim,
        "qk_nope_head_dim": m.qk_nope_head_dim, "v_head_dim": m.v_head_dim, "rope_interleave": False,
        "attention_bias": cfg.qkv_bias, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "torch_dtype": name, "dtype": name,
    }


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
    hf_config = json.loads((directory / "config.json").read_text())
    cfg = config_from_hf(hf_config, str(directory / "config.json"))
    raw = _read_hf_weights(directory)
    if hf_config["model_type"] == "mpt":
        raw = state_from_mpt(raw, cfg)
    if hf_config["model_type"] == "t5":
        cfg = config_from_t5(hf_config, str(directory / "config.json"), raw)
        raw = state_from_t5(raw, cfg, str(directory))
    state = {}
    for name, tensor in raw.items():
        if name.endswith("rotary_emb.inv_freq"):        # a buffer some old checkpoints saved
            continue
        state[name.removeprefix("model.")] = tensor
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    lm_head_absent = bool(cfg.score_outputs) and not cfg.tie_embeddings and "lm_head.weight" not in state
    if lm_head_absent:          # a sequence classifier has none: zero, so no token is preferred
        state["lm_head.weight"] = torch.zeros_like(state["embed_tokens.weight"])
    if cfg.attn_kind == "mla":
        if hf_config.get("rope_interleave", True):
            _deinterleave_rope(cfg, state)
        if cfg.qkv_bias and MLAShape.of(cfg).q_lora_rank is None:   # kvlab's q_proj has the bias DeepSeek's lacks
            for i in range(cfg.n_layer):
                w = state.get(f"layers.{i}.self_attn.q_proj.weight")
                if w is not None:
                    state.setdefault(f"layers.{i}.self_attn.q_proj.bias", w.new_zeros(w.shape[0]))
    model = build_model(cfg, state, where=str(directory), device=device, dtype=dtype)
    model.tokenizer = load_tokenizer(directory)
    model.provenance = new_provenance("hf", path=str(directory.resolve()), model_type=hf_config["model_type"],
                                      **({"lm_head": "absent (a sequence classifier): zero"} if lm_head_absent else {}))
    return model


def _constant_latent_channel(model: Transformer, hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A norm-free latent in DeepSeek-V3's always-normalised one: one more latent channel holds a
    constant ``M`` (a bias), so that ``rms([c, M]) = M / sqrt(rank + 1)`` for every token — exactly in
    float32, since ``M`` is chosen with ``|c|² < 2⁻³⁰ M²`` from a bound on ``|c|`` — and the norm's
    weights (a power of two) with ``kv_b_proj`` (the remaining factor) undo that fixed scale. The
    constant channel's norm weight and up-projection are zero. Costs one cache channel per layer in
    transformers; kvlab's own format keeps the norm-free latent."""
    cfg = model.cfg
    rank = MLAShape.of(cfg).kv_lora_rank
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf_config["kv_lora_rank"] = rank + 1
    hf_config["attention_bias"] = True
    for i in range(cfg.n_layer):
        pre = f"layers.{i}.self_attn"
        w = state[f"{pre}.kv_a_proj_with_mqa.weight"].double()
        b = state.get(f"{pre}.kv_a_proj_with_mqa.bias")
        b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.double()
        x_bound = cfg.d_model ** 0.5 * float(state[f"layers.{i}.input_layernorm.weight"].double().abs().max())
        c_bound = float(torch.linalg.matrix_norm(w[:rank], ord=2)) * x_bound + float(b[:rank].norm())
        M = 2.0 ** (math.ceil(math.log2(max(c_bound, 1e-3))) + 16)
        scale = M / math.sqrt(rank + 1)
        norm_w = 2.0 ** round(math.log2(scale))
        zero_row = torch.zeros(1, w.shape[1], dtype=w.dtype)
        new_w = torch.cat([w[:rank], zero_row, w[rank:]])
        new_b = torch.cat([b[:rank], torch.tensor([M], dtype=b.dtype), b[rank:]])
        dtype = state[f"{pre}.kv_a_proj_with_mqa.weight"].dtype
        state[f"{pre}.kv_a_proj_with_mqa.weight"] = new_w.to(dtype)
        state[f"{pre}.kv_a_proj_with_mqa.bias"] = new_b.to(dtype)
        state[f"{pre}.kv_a_layernorm.weight"] = torch.cat([torch.full((rank,), norm_w), torch.zeros(1)]).to(dtype)
        up = state[f"{pre}.kv_b_proj.weight"].double() * (scale / norm_w)
        state[f"{pre}.kv_b_proj.weight"] = torch.cat([up, torch.zeros(up.shape[0], 1, dtype=up.dtype)], 1).to(dtype)
        o = state[f"{pre}.o_proj.weight"]
        state.setdefault(f"{pre}.o_proj.bias", o.new_zeros(o.shape[0]))
        if MLAShape.of(cfg).q_lora_rank is not None:
            qa = state[f"{pre}.q_a_proj.weight"]
            state.setdefault(f"{pre}.q_a_proj.bias", qa.new_zeros(qa.shape[0]))
    return state


def export_hf(model: Transformer, directory: str | Path, *, dtype: torch.dtype | None = None,
              overwrite: bool = False) -> Path:
    """Write ``model`` as a HF checkpoint directory that ``transformers`` loads as it is (an
    existing ``directory`` is replaced only under :mod:`kvlab.io.atomic`'s output policy)."""
    refuse_adapter(model)
    dtype = dtype or model.dtype
    hf_config = config_to_hf(model.cfg, dtype, model)
    source = without_key_balance(model.state_dict())     # the same outputs: transformers stores keys as projected
    if hf_config["model_type"] == "deepseek_v3" and not MLAShape.of(model.cfg).latent_norm:
        source = _constant_latent_channel(model, hf_config)
    state = {}
    if hf_config["model_type"] == "mpt":
        source = {f"as-is:{k}": v for k, v in state_to_mpt(source, model.cfg).items()}
    if hf_config["model_type"] == "t5":
        if needs_expansion(model.cfg):
            warnings.warn("HF's T5 is MHA in every layer: the decoder's shared K/V heads and layers are written out "
                          "as copies (same logits; transformers keeps the full MHA cache, kvlab the small one)",
                          stacklevel=2)
            source = expanded_kv(source, model.cfg)
        source = {f"as-is:{k}": v for k, v in state_to_t5(source, model.cfg).items()}
    for name, tensor in source.items():
        if name.startswith("as-is:"):
            state[name.removeprefix("as-is:")] = tensor.detach().to(dtype).contiguous().cpu()
            continue
        if name == "lm_head.weight" and (model.cfg.tie_embeddings or model.cfg.score_outputs):
            continue                                        # tied, or a sequence classifier (no LM head)
        if hf_config["model_type"] == "deepseek_v3" and name.endswith("self_attn.q_proj.bias"):
            continue                                        # zero (checked): DeepSeek's q_proj has no bias
        key = name if name.startswith(("lm_head.", "score.")) else f"model.{name}"
        state[key] = tensor.detach().to(dtype).contiguous().cpu()
    tokenizer = model.tokenizer

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        special = {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id,
                   "pad_token_id": model.cfg.pad_token_id}
        if model.cfg.is_encoder_decoder:
            special["decoder_start_token_id"] = model.cfg.decoder_start_token_id
        (tmp / "generation_config.json").write_text(json.dumps(special, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None and getattr(tokenizer, "kind", None) == "hf":
            tokenizer.save(tmp)

    return write_dir_atomically(directory, fill, kind="hf-checkpoint", overwrite=overwrite)

"""HF transformers' MPT (MosaicML): the ALiBi architecture kvlab imports and exports.

MPT is a sequential pre-LayerNorm decoder with ALiBi instead of position embeddings, a fused
``Wqkv`` projection (q, k, v stacked), a GELU MLP of 4·d_model, no biases anywhere (its LayerNorms
have none either) and tied embeddings — in kvlab terms ``pos="alibi"``, ``mlp="gelu"``,
``norm="layernorm"`` with zero biases, ``tie_embeddings=True``. Its slopes are the ALiBi paper's,
``2^(-8i/n)``, for a power-of-two head count; for other counts MPT orders them differently from
the paper (and from kvlab), so those are refused rather than silently changed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvlab.config.model import ModelConfig
from kvlab.errors import CheckpointError, ConfigError


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def config_from_mpt(hf: dict[str, Any], where: str) -> ModelConfig:
    attn = hf.get("attn_config") or {}
    missing = [k for k in ("vocab_size", "d_model", "n_layers", "n_heads") if not isinstance(hf.get(k), int)]
    if missing:
        raise CheckpointError(f"{where}: the mpt config lacks {', '.join(missing)} (or they are not integers)")
    problems = []
    if not attn.get("alibi", True):
        problems.append("attn_config.alibi=false (transformers' MPT always adds ALiBi)")
    if attn.get("alibi_bias_max", 8) != 8:
        problems.append(f"alibi_bias_max={attn['alibi_bias_max']} (kvlab's ALiBi uses the paper's 8)")
    if not _power_of_two(hf["n_heads"]):
        problems.append(f"n_heads={hf['n_heads']} (MPT orders the slopes of a head count that is not a power of "
                        f"two unlike the ALiBi paper and kvlab)")
    if attn.get("clip_qkv"):
        problems.append(f"clip_qkv={attn['clip_qkv']}")
    if attn.get("qk_ln"):
        problems.append("qk_ln=true")
    if hf.get("logit_scale") not in (None, 1, 1.0):
        problems.append(f"logit_scale={hf['logit_scale']}")
    if attn.get("softmax_scale") not in (None, 1 / math.sqrt(hf["d_model"] / hf["n_heads"])):
        problems.append(f"softmax_scale={attn['softmax_scale']} (kvlab scales by 1/sqrt(head_dim))")
    if problems:
        raise CheckpointError(f"{where}: this MPT model has " + "; ".join(problems) + ", which kvlab does not "
                              "implement")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layer=hf["n_layers"], n_head=hf["n_heads"],
            mlp="gelu", d_ff=int(hf.get("expansion_ratio", 4) * hf["d_model"]), norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), pos="alibi", tie_embeddings=True,
            max_seq_len=int(hf.get("max_seq_len", 2048)), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
            name=hf.get("_name_or_path") or None)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def state_from_mpt(raw: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """MPT's tensor names and fused ``Wqkv`` as kvlab's, with the zero LayerNorm biases MPT lacks."""
    state: dict[str, torch.Tensor] = {}
    rename = {"attn.out_proj": "self_attn.o_proj", "ffn.up_proj": "mlp.up_proj", "ffn.down_proj": "mlp.down_proj",
              "norm_1": "input_layernorm", "norm_2": "post_attention_layernorm"}
    for name, t in raw.items():
        name = name.removeprefix("transformer.")
        if name == "wte.weight":
            state["embed_tokens.weight"] = t
        elif name.startswith("norm_f."):
            state[name.replace("norm_f.", "norm.")] = t
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            if rest == "attn.Wqkv.weight":
                for part, w in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    state[f"layers.{i}.self_attn.{part}.weight"] = w.contiguous()
                continue
            module, leaf = rest.rsplit(".", 1)
            state[f"layers.{i}.{rename.get(module, module)}.{leaf}"] = t
        elif name != "lm_head.weight":                    # tied to wte
            state[name] = t
    for key in [k for k in state if k.endswith("layernorm.weight") or k == "norm.weight"]:
        state.setdefault(key.removesuffix("weight") + "bias", torch.zeros_like(state[key]))
    return state


def mpt_problems(cfg: ModelConfig, model=None) -> list[str]:
    """Why a kvlab ALiBi model is not an MPT model (empty if it is)."""
    problems = []
    checks = ((cfg.attention_layers is not None or cfg.attn_kind != "gqa", "per-layer attention specs or another kind"),
              (cfg.n_kv_head != cfg.n_head, f"{cfg.n_kv_head} KV heads for {cfg.n_head} query heads (MPT is MHA)"),
              (cfg.n_kv_layers != cfg.n_layer, "Cross-Layer Attention"),
              (not _power_of_two(cfg.n_head), f"n_head={cfg.n_head}, not a power of two (MPT orders such slopes "
                                              f"differently)"),
              (cfg.head_dim * cfg.n_head != cfg.d_model, "head_dim x n_head != d_model"),
              (cfg.mlp != "gelu" or cfg.d_ff != 4 * cfg.d_model, "an MLP other than GELU with d_ff = 4 x d_model"),
              (cfg.norm != "layernorm", "RMSNorm (MPT uses LayerNorm)"),
              (cfg.block != "sequential", "parallel blocks"),
              (cfg.qkv_bias or cfg.o_bias, "attention biases (MPT has none)"),
              (not cfg.tie_embeddings, "an untied LM head (MPT ties it to the embeddings)"),
              (cfg.sliding_window is not None or cfg.block_sparse is not None, "a window or a block-sparse layout"))
    problems += [what for bad, what in checks if bad]
    if model is not None:
        biased = [k for k, v in model.state_dict().items() if k.endswith("norm.bias") or
                  (k.endswith("layernorm.bias"))]
        if any(model.state_dict()[k].abs().max() > 0 for k in biased):
            problems.append("nonzero LayerNorm biases (MPT's LayerNorms have no bias)")
    return problems


def config_to_mpt(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {"architectures": ["MptForCausalLM"], "model_type": "mpt", "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "n_heads": cfg.n_head, "n_layers": cfg.n_layer, "expansion_ratio": 4,
            "max_seq_len": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps, "no_bias": True,
            "learned_pos_emb": False,
            "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_type": "multihead_attention"},
            "tie_word_embeddings": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id, "torch_dtype": str(dtype).removeprefix("torch.")}


def state_to_mpt(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": state["embed_tokens.weight"], "transformer.norm_f.weight": state["norm.weight"]}
    names = {"self_attn.o_proj.weight": "attn.out_proj.weight", "mlp.up_proj.weight": "ffn.up_proj.weight",
             "mlp.down_proj.weight": "ffn.down_proj.weight", "input_layernorm.weight": "norm_1.weight",
             "post_attention_layernorm.weight": "norm_2.weight"}
    for i in range(cfg.n_layer):
        pre = f"layers.{i}."
        out[f"transformer.blocks.{i}.attn.Wqkv.weight"] = torch.cat(
            [state[pre + f"self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
        for ours, theirs in names.items():
            out[f"transformer.blocks.{i}.{theirs}"] = state[pre + ours]
    if "score.weight" in state:                     # MptForSequenceClassification's head
        out["score.weight"] = state["score.weight"]
    return out

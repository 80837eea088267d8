"""HF transformers' T5 (``T5ForConditionalGeneration``): the encoder–decoder kvlab imports and exports.

T5 in kvlab terms: ``pos="t5"`` (a learned relative bias per stack: bidirectional in the encoder,
causal in the decoder, none in cross-attention), RMSNorm without bias, unscaled attention
(``attn_scale=1``: T5 folds ``1/sqrt(d_kv)`` into its initialisation; a kvlab model with scaled
scores is exported with the scale folded into its query projections), no biases anywhere, MLP
``relu`` (the original T5), ``geglu`` (T5 v1.1's ``gated-gelu``: tanh GELU), ``gelu`` or ``swiglu``
(``gated-silu``). The original T5 ties the LM head to the shared embedding and scales the decoder's
output by ``d_model ** -0.5`` before it (``output_scale``); T5 v1.1 does neither.

HF's T5 is MHA everywhere. A kvlab model whose decoder self- or cross-attention has fewer K/V
heads, or shares them across layers (CLA), is exported with every shared head and layer copied
out (logits unchanged, :func:`expanded_kv`): transformers then runs it, but keeps the full MHA cache
— the smaller cache is kvlab's. Padding: HF counts padding in T5's relative positions and kvlab
counts real tokens only, so the two agree on right-padded sources (T5's tokenizers pad right).
"""

from __future__ import annotations

from typing import Any

import torch

from kvlab.config.model import ModelConfig
from kvlab.errors import CheckpointError, ConfigError

# HF's feed_forward_proj -> kvlab's mlp.
MLPS = {"relu": "relu", "gated-gelu": "geglu", "gelu": "gelu", "gated-silu": "swiglu"}
GATED = ("geglu", "swiglu")


def config_from_t5(hf: dict[str, Any], where: str, raw: dict[str, torch.Tensor] | None = None) -> ModelConfig:
    """The config of a HF T5; with its weights ``raw``, the LM head is untied when the file holds an
    ``lm_head.weight`` that differs from ``shared.weight`` (transformers' own rule: from version 5 on
    it writes ``tie_word_embeddings: true`` even for T5 v1.1's untied head)."""
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
               if not isinstance(hf.get(k), int)]
    if missing:
        raise CheckpointError(f"{where}: the t5 config lacks {', '.join(missing)} (or they are not integers)")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in MLPS:
        raise CheckpointError(f"{where}: feed_forward_proj {proj!r} is not supported; kvlab imports "
                              f"{', '.join(MLPS)}")
    # transformers >= 5 records the output scaling itself; earlier versions derived it from tying.
    declared_tied = hf.get("tie_word_embeddings", True) is not False
    scaled = hf.get("scale_decoder_outputs", declared_tied)
    tied = declared_tied
    if raw is not None and "shared.weight" in raw:
        head = raw.get("lm_head.weight")
        tied = head is None or torch.equal(head, raw["shared.weight"])
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"],
            n_layer=hf.get("num_decoder_layers") or hf["num_layers"],
            n_encoder_layer=hf["num_layers"], n_head=hf["num_heads"], head_dim=hf["d_kv"], mlp=MLPS[proj],
            d_ff=hf["d_ff"], norm="rmsnorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), pos="t5",
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128), attn_scale=1.0,
            output_scale=hf["d_model"] ** -0.5 if scaled else 1.0, tie_embeddings=tied,
            max_seq_len=hf.get("n_positions") or 512, eos_token_id=_first(hf.get("eos_token_id", 1)),
            pad_token_id=pad, decoder_start_token_id=start if start is not None else pad,
            name=hf.get("_name_or_path") or None)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _first(v):
    return v[0] if isinstance(v, list) else v


def _names(cfg: ModelConfig) -> dict[str, str]:
    """kvlab's name -> HF T5's, for every tensor of an MHA T5 (no CLA)."""
    ff = {"mlp.gate_proj": "wi_0", "mlp.up_proj": "wi_1", "mlp.down_proj": "wo"} if cfg.mlp in GATED else \
        {"mlp.up_proj": "wi", "mlp.down_proj": "wo"}
    attn = {f"{p}_proj": p for p in "qkvo"}
    names = {"embed_tokens.weight": "shared.weight", "encoder.norm.weight": "encoder.final_layer_norm.weight",
             "norm.weight": "decoder.final_layer_norm.weight"}
    if cfg.pos == "t5":
        for ours, stack in (("encoder.", "encoder"), ("", "decoder")):
            names[f"{ours}embed_relative.relative_attention_bias.weight"] = \
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    for i in range(cfg.n_encoder_layer):
        ours, theirs = f"encoder.layers.{i}.", f"encoder.block.{i}.layer."
        names[ours + "input_layernorm.weight"] = theirs + "0.layer_norm.weight"
        names[ours + "post_attention_layernorm.weight"] = theirs + "1.layer_norm.weight"
        names.update({f"{ours}self_attn.{a}.weight": f"{theirs}0.SelfAttention.{b}.weight" for a, b in attn.items()})
        names.update({f"{ours}{a}.weight": f"{theirs}1.DenseReluDense.{b}.weight" for a, b in ff.items()})
    for i in range(cfg.n_layer):
        ours, theirs = f"layers.{i}.", f"decoder.block.{i}.layer."
        names[ours + "input_layernorm.weight"] = theirs + "0.layer_norm.weight"
        names[ours + "cross_attn_layernorm.weight"] = theirs + "1.layer_norm.weight"
        names[ours + "post_attention_layernorm.weight"] = theirs + "2.layer_norm.weight"
        names.update({f"{ours}self_attn.{a}.weight": f"{theirs}0.SelfAttention.{b}.weight" for a, b in attn.items()})
        names.update({f"{ours}cross_attn.{a}.weight": f"{theirs}1.EncDecAttention.{b}.weight" for a, b in attn.items()})
        names.update({f"{ours}{a}.weight": f"{theirs}2.DenseReluDense.{b}.weight" for a, b in ff.items()})
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


# Copies of the shared embedding, and a bias T5 builds but never reads.
IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def state_from_t5(raw: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    names = _names(cfg)
    theirs = {v: k for k, v in names.items()}
    unknown = sorted(set(raw) - set(theirs) - set(IGNORED) - {"lm_head.weight"})
    missing = sorted(set(theirs) - set(raw))
    if unknown or missing:
        raise CheckpointError(f"{where}: the weights do not match a T5 of this config: missing {missing[:5]}, "
                              f"unexpected {unknown[:5]}")
    return {theirs[k]: t for k, t in raw.items() if k in theirs}


def t5_problems(cfg: ModelConfig) -> list[str]:
    """Why a kvlab encoder–decoder is not a HF T5 (empty if it is, up to K/V expansion)."""
    checks = ((cfg.pos != "t5", f"{cfg.pos} positions (T5 has its relative bias)"),
              (cfg.mlp not in MLPS.values(), f"a {cfg.mlp} MLP"),
              (cfg.norm != "rmsnorm", "LayerNorm (T5's norm is RMSNorm without bias)"),
              (cfg.qkv_bias or cfg.o_bias, "attention biases (T5 has none)"),
              (cfg.sliding_window is not None or cfg.attention_layers is not None or cfg.block_sparse is not None,
               "windows, per-layer specs or block-sparse layouts"),
              (cfg.output_scale not in (1.0, cfg.d_model ** -0.5),
               f"output_scale={cfg.output_scale} (T5 scales by d_model ** -0.5 or not at all)"))
    return [what for bad, what in checks if bad]


def config_to_t5(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    problems = t5_problems(cfg)
    if problems:
        raise ConfigError("cannot export to HF T5: " + "; ".join(problems) + "; keep this model in the kvlab format")
    proj = {v: k for k, v in MLPS.items()}[cfg.mlp]
    scaled = cfg.output_scale != 1.0
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff,
            "num_layers": cfg.n_encoder_layer, "num_decoder_layers": cfg.n_layer, "num_heads": cfg.n_head,
            "relative_attention_num_buckets": cfg.relative_buckets,
            "relative_attention_max_distance": cfg.relative_max_distance, "layer_norm_epsilon": cfg.norm_eps,
            "feed_forward_proj": proj, "dense_act_fn": "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1],
            "is_gated_act": proj.startswith("gated"), "dropout_rate": 0.0, "n_positions": cfg.max_seq_len,
            # Before transformers 5 tying implied the scaling; from 5 on it is its own field.
            "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": scaled,
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0,
            "eos_token_id": cfg.eos_token_id, "decoder_start_token_id": cfg.decoder_start_token_id,
            "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch.")}


def expanded_kv(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``state`` with every decoder layer's self- and cross-attention K/V projections as MHA ones:
    each K/V head repeated for its query group, each CLA consumer given its producer's projections
    (the same keys and values, so the same logits)."""
    out = dict(state)
    G_self, G_cross = cfg.n_head // cfg.n_kv_head, cfg.n_head // cfg.cross_n_kv_head
    for i in range(cfg.n_layer):
        for attn, source, group in (("self_attn", cfg.kv_sources[i], G_self),
                                    ("cross_attn", cfg.cross_kv_sources[i], G_cross)):
            for p in ("k_proj", "v_proj"):
                w = state[f"layers.{source}.{attn}.{p}.weight"]
                heads = w.view(-1, cfg.head_dim, w.shape[1])
                out[f"layers.{i}.{attn}.{p}.weight"] = heads.repeat_interleave(group, 0).reshape(-1, w.shape[1])
    return out


def state_to_t5(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF T5's tensors; a model with scaled scores gets the scale folded into every query projection
    (``(s·q)·k = s·(q·k)``: T5's scores are unscaled, and the logits stay the same)."""
    names = _names(cfg)
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
    out = {}
    for ours, theirs in names.items():
        t = state[ours]
        out[theirs] = t * scale if scale != 1.0 and ours.endswith("q_proj.weight") else t
    return out


def needs_expansion(cfg: ModelConfig) -> bool:
    return (cfg.n_kv_head != cfg.n_head or cfg.cross_n_kv_head != cfg.n_head or cfg.n_kv_layers != cfg.n_layer
            or cfg.cross_cla != 1)



"""Validation of a :class:`~kvlab.config.model.ModelConfig`: every field's JSON type, then every
rule between fields, each failure one :class:`ConfigError` naming the value, the rule and the fix.
The kinds validate their own options (:func:`kvlab.config.specs.validate_specs`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kvlab.config.specs import validate_specs
from kvlab.errors import ConfigError, require_positive_ints
from kvlab.registry import backend_names, kinds_without

if TYPE_CHECKING:   # annotations only: ModelConfig calls this module, not the other way round
    from kvlab.config.model import ModelConfig

# swiglu: Llama; gelu: GPT-2; geglu: T5 v1.1's gated GELU (tanh form); relu: the original T5's.
MLP_TYPES = ("swiglu", "gelu", "geglu", "relu")
GATED_MLPS = ("swiglu", "geglu")
NORM_TYPES = ("rmsnorm", "layernorm")
POS_TYPES = ("rope", "learned", "alibi", "t5")
BLOCK_TYPES = ("sequential", "parallel")
SINK_POSITIONS = ("original", "cache")


# The JSON types each annotation admits (a config file may say "4" or 4.5 or "yes" anywhere).


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list,),
          "dict": (dict,)}

def check_types(cfg: "ModelConfig") -> None:
    """Raise :class:`ConfigError` for a field whose value has the wrong JSON type, before any
    arithmetic on it (``"n_layer": "4"``, ``"tie_embeddings": "yes"``)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kinds = [k.strip().split("[")[0] for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds if k in _TYPES for t in _TYPES[k])
        if not allowed or "Any" in kinds:
            continue
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                     "list": "a list", "dict": "an object", "None": "null"}
            want = " or ".join(names.get(k, k) for k in kinds)
            raise ConfigError(f"{f.name}={value!r} must be {want}")

def validate_config(cfg: "ModelConfig") -> None:
    """Raise :class:`ConfigError` naming the first impossible value, the rule and the fix."""
    require_positive_ints(cfg, ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim",
                                 "d_ff", "max_seq_len", "cla", "relative_buckets", "relative_max_distance"))
    if cfg.n_kv_head > cfg.n_head:
        raise ConfigError(f"n_kv_head={cfg.n_kv_head} exceeds n_head={cfg.n_head}; "
                          f"a KV head serves one or more query heads, so use n_kv_head <= n_head")
    if cfg.n_head % cfg.n_kv_head:
        divisors = [d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0]
        raise ConfigError(f"n_head={cfg.n_head} is not divisible by n_kv_head={cfg.n_kv_head}; "
                          f"n_kv_head must be one of {divisors}")
    if cfg.pos == "rope" and cfg.head_dim % 2:
        raise ConfigError(f"head_dim={cfg.head_dim} is odd; RoPE rotates pairs of dimensions, "
                          f"so use an even head_dim or pos='learned'")
    for name, allowed in (("mlp", MLP_TYPES), ("norm", NORM_TYPES), ("pos", POS_TYPES),
                          ("block", BLOCK_TYPES)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")
    if not (isinstance(cfg.norm_eps, (int, float)) and cfg.norm_eps > 0):
        raise ConfigError(f"norm_eps={cfg.norm_eps!r} must be a positive number")
    if not (isinstance(cfg.rope_theta, (int, float)) and cfg.rope_theta > 0):
        raise ConfigError(f"rope_theta={cfg.rope_theta!r} must be a positive number")
    if cfg.sliding_window is not None and (not isinstance(cfg.sliding_window, int)
                                            or cfg.sliding_window < 1):
        raise ConfigError(f"sliding_window={cfg.sliding_window!r} must be a positive integer or None")
    if not isinstance(cfg.attention_sinks, int) or isinstance(cfg.attention_sinks, bool) or \
            cfg.attention_sinks < 0:
        raise ConfigError(f"attention_sinks={cfg.attention_sinks!r} must be a non-negative integer")
    if cfg.score_outputs is not None and cfg.score_outputs < 1:
        raise ConfigError(f"score_outputs={cfg.score_outputs!r} must be a positive integer or null")
    if cfg.sink_positions not in SINK_POSITIONS:
        raise ConfigError(f"sink_positions={cfg.sink_positions!r} is not one of {list(SINK_POSITIONS)}")
    if cfg.key_balance and cfg.sink_positions == "cache" and any(cfg.layer_sinks(i) for i in range(cfg.n_layer)):
        raise ConfigError("key_balance stores keys centred and scaled, and sink_positions='cache' re-rotates the "
                          "sinks' keys as projected; use one of them (sink_positions='original' keeps balance)")
    if cfg.sink_positions == "cache" and cfg.pos != "rope":
        raise ConfigError(f"sink_positions='cache' re-positions rotary keys (StreamingLLM) and pos={cfg.pos!r} "
                          f"has none; use sink_positions='original'")
    if cfg.pos == "t5" and not 4 <= cfg.relative_buckets <= cfg.relative_max_distance:
        raise ConfigError(f"relative_buckets={cfg.relative_buckets} with relative_max_distance="
                          f"{cfg.relative_max_distance}: T5's bias needs at least 4 buckets and no more buckets "
                          f"than the distance they cover (T5 uses 32 and 128)")
    if cfg.cla > cfg.n_layer:
        raise ConfigError(f"cla={cfg.cla} exceeds n_layer={cfg.n_layer}; "
                          f"a sharing factor can be at most the number of layers")
    if cfg.kv_source is not None:
        if cfg.cla != 1:
            raise ConfigError(f"both cla={cfg.cla} and kv_source are set; give one of them "
                              f"(cla=k is kv_source[i] = k*(i//k))")
        _validate_kv_source(cfg, cfg.kv_source)
    if cfg.attn_backend not in backend_names():
        raise ConfigError(f"attn_backend={cfg.attn_backend!r} is not one of {backend_names()}")
    validate_specs(cfg)
    _validate_encoder_decoder(cfg)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        tok = getattr(cfg, name)
        if tok is not None and not (0 <= tok < cfg.vocab_size):
            raise ConfigError(f"{name}={tok} is outside the vocabulary [0, {cfg.vocab_size})")

def _validate_encoder_decoder(cfg: "ModelConfig") -> None:
    if cfg.attn_scale is not None:
        if not (isinstance(cfg.attn_scale, (int, float)) and cfg.attn_scale > 0):
            raise ConfigError(f"attn_scale={cfg.attn_scale!r} must be a positive number or null "
                              f"(1/sqrt(head_dim))")
        kinds = kinds_without("softmax_scores", cfg.kinds)
        if kinds:
            raise ConfigError(f"attn_scale applies to softmax (gqa) layers; this model has {kinds} layers, "
                              f"so leave attn_scale null")
    if not isinstance(cfg.n_encoder_layer, int) or cfg.n_encoder_layer < 0:
        raise ConfigError(f"n_encoder_layer={cfg.n_encoder_layer!r} must be a non-negative integer "
                          f"(0: a decoder-only model)")
    if not (isinstance(cfg.output_scale, (int, float)) and cfg.output_scale > 0):
        raise ConfigError(f"output_scale={cfg.output_scale!r} must be a positive number")
    if not cfg.is_encoder_decoder:
        extra = [f"{name}={getattr(cfg, name)!r}" for name, default in
                 (("cross_n_kv_head", None), ("cross_cla", 1), ("output_scale", 1.0),
                  ("decoder_start_token_id", None)) if getattr(cfg, name) != default]
        if extra:
            raise ConfigError(f"{', '.join(extra)} describe an encoder–decoder, but n_encoder_layer=0; "
                              f"set n_encoder_layer > 0 or drop them")
        return
    require_positive_ints(cfg, ("cross_n_kv_head", "cross_cla"))
    if cfg.n_head % cfg.cross_n_kv_head:
        divisors = [d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0]
        raise ConfigError(f"cross_n_kv_head={cfg.cross_n_kv_head} does not divide n_head={cfg.n_head}; "
                          f"it must be one of {divisors}")
    if cfg.cross_cla > cfg.n_layer:
        raise ConfigError(f"cross_cla={cfg.cross_cla} exceeds the decoder's n_layer={cfg.n_layer}")
    if cfg.pos not in ("t5", "rope"):
        raise ConfigError(f"pos={cfg.pos!r} in an encoder–decoder: use 't5' (T5's relative bias) or 'rope'")
    kinds = kinds_without("encoder_decoder", cfg.kinds)
    if kinds:
        raise ConfigError(f"an encoder–decoder's decoder cfg-attention is softmax attention (gqa); "
                          f"{kinds} layers are not supported there")
    if cfg.block != "sequential":
        raise ConfigError("block='parallel' in an encoder–decoder: its blocks are sequential (T5); "
                          "use block='sequential'")
    if cfg.score_outputs:
        raise ConfigError("score_outputs on an encoder–decoder is not supported; use a decoder-only model")


def _validate_kv_source(cfg: "ModelConfig", src: list[int]) -> None:
    if len(src) != cfg.n_layer:
        raise ConfigError(f"kv_source has {len(src)} entries but n_layer={cfg.n_layer}; "
                          f"give one source layer per layer")
    for i, s in enumerate(src):
        if not 0 <= s <= i:
            raise ConfigError(f"kv_source[{i}]={s}: a layer reads KV from itself or an earlier "
                              f"layer, so it must be in [0, {i}]")
        if src[s] != s:
            raise ConfigError(f"kv_source[{i}]={s} but layer {s} does not produce KV "
                              f"(kv_source[{s}]={src[s]}); point layer {i} at a producer layer "
                              f"(one whose kv_source is itself)")

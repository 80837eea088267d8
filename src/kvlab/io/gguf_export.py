"""GGUF export through the ``gguf`` package, so that a shrunk model runs in llama.cpp and Ollama: GQA/MQA
models as llama.cpp's ``llama`` architecture, MLA models as its ``deepseek2`` (:func:`gguf_architecture`).

llama.cpp's conventions, as its ``convert_hf_to_gguf.py`` writes them and :mod:`kvlab.io.gguf`
reads them back: tensor names ``token_embd`` / ``blk.N.attn_q`` ..., the rows of Q and K permuted
so that rotary pairs are interleaved (:func:`permute_rope_rows`, the inverse of the importer's),
1-D tensors (norms, biases) always F32, the hyper-parameters under ``llama.*``, and the tokenizer
as ``tokenizer.ggml.*`` metadata: the vocabulary in id order, each token's type (control for
special added tokens, user-defined for the other added ones), the BPE merges, llama.cpp's name for
the pre-tokenizer, the special token ids and the chat template.

An MLA model becomes a dense ``deepseek2`` model without query compression (``q_lora_rank`` 0, every
block a dense one): llama.cpp runs it absorbed, caching the latent and the shared RoPE key per token
as kvlab does, with ``attn_k_b``/``attn_v_b`` (``kv_b_proj`` split per head, the key part transposed)
and its rotary pairs adjacent (the RoPE rows of ``attn_q`` and ``attn_kv_a_mqa`` permuted). llama.cpp
always RMS-normalises the latent; a converted model's latent is norm-free, so its rows are scaled
down by a power of two ``s`` until the norm's epsilon dominates, and the norm weight is ``√ε / s``:
``RMSNorm(s·c)·w = c / sqrt(1 + s²·mean(c²)/ε)``, equal to ``c`` within 2⁻²⁵ for every input the
layer can see (``s`` from a bound on ``c``). Those scaled rows would underflow float16, so that one
tensor stays F32 — and must stay so: requantizing the file with llama.cpp's ``llama-quantize`` would
round those entries to zero (its block scales are float16; :func:`gguf_notes` says so where it
applies). deepseek2 has no bias tensors: a model with biases is refused. kvlab reads back the llama
GGUFs it writes (:mod:`kvlab.io.gguf`), not deepseek2 ones.

Weights are written as F32, F16 or Q8_0 (``gguf.quants``). A file kvlab writes carries
``kvlab.exported``; an existing path is replaced only when it is such a file (written to a
temporary sibling and renamed over it), never a file of the user's.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from kvlab.errors import ConfigError
from kvlab.io.atomic import OutputExistsError, apply_umask, make_parents, remove_empty
from kvlab.io.gguf import _GLOBAL_NAMES, _LAYER_NAMES, _LLAMA3_SPLIT, _QWEN2_SPLIT
from kvlab.io.weights import refuse_adapter, without_key_balance
from kvlab.models.decoder import Transformer

GGUF_TYPES = ("f32", "f16", "q8_0")
MARKER_KEY = "kvlab.exported"
_TO_GGUF = {v: k for k, v in _GLOBAL_NAMES.items()} | {f"layers.{{i}}.{v}": f"blk.{{i}}.{k}"
                                                       for k, v in _LAYER_NAMES.items()}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4          # llama.cpp token types


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rotary layout -> llama.cpp's interleaved pairs, per head (the inverse of
    :func:`kvlab.io.gguf.unpermute_rope_rows`)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_architecture(cfg) -> str:
    """llama.cpp's architecture for ``cfg``: ``deepseek2`` for MLA in every layer, else ``llama``."""
    return "deepseek2" if cfg.attention_layers is None and cfg.attn_kind == "mla" else "llama"


def gguf_problems(cfg) -> list[str]:
    """Why ``cfg`` is not a model of its llama.cpp architecture (:func:`gguf_architecture`; empty if it is)."""
    arch = gguf_architecture(cfg)
    problems = []
    if cfg.is_encoder_decoder:
        problems.append(f"an encoder–decoder (llama.cpp's {arch} architecture is decoder-only; export it as HF T5)")
    if arch == "llama" and (cfg.attention_layers is not None or cfg.attn_kind != "gqa"):
        problems.append(f"the {cfg.attn_kind!r} attention kind / per-layer attention specs (llama.cpp's llama "
                        f"architecture is softmax GQA in every layer, its deepseek2 MLA in every layer)")
    if arch == "deepseek2":
        from kvlab.attention.mla import MLAShape

        if cfg.qkv_bias or cfg.o_bias:
            problems.append("biases in the attention projections (llama.cpp's deepseek2 architecture has none)")
        if not MLAShape.of(cfg).latent_norm and not cfg.norm_eps > 0:
            problems.append("a norm-free latent with norm_eps 0 (llama.cpp's deepseek2 normalises the latent; "
                            "kvlab carries a norm-free one through the norm's epsilon)")
        if MLAShape.of(cfg).qk_nope_head_dim < 1:
            problems.append("MLA without position-free query/key channels (qk_nope_head_dim 0; llama.cpp's "
                            "deepseek2 needs at least one)")
    if cfg.n_kv_layers != cfg.n_layer:
        problems.append(f"Cross-Layer Attention (llama.cpp's {arch} architecture has a KV cache per layer)")
    for bad, what in ((cfg.pos != "rope", f"{cfg.pos} positions"), (cfg.block != "sequential", "parallel blocks"),
                      (cfg.mlp != "swiglu", f"a {cfg.mlp} MLP"), (cfg.norm != "rmsnorm", "LayerNorm"),
                      (cfg.sliding_window is not None, f"a sliding window (llama.cpp's {arch} architecture "
                                                        f"attends to the whole context)"),
                      (cfg.attention_sinks, "attention sinks"), (cfg.block_sparse is not None, "a block-sparse layout"),
                      (bool(cfg.score_outputs), f"a score head (a reward model; llama.cpp's {arch} models are "
                                                f"language models)")):
        if bad:
            problems.append(what)
    return problems


def gguf_notes(cfg) -> list[str]:
    """What a user of ``cfg``'s GGUF export must know beyond the file (empty for most models)."""
    from kvlab.attention.mla import MLAShape

    if gguf_architecture(cfg) == "deepseek2" and not MLAShape.of(cfg).latent_norm:
        return ["the latent is norm-free, carried through llama.cpp's latent RMSNorm by scaling attn_kv_a_mqa "
                "far down; that tensor is F32 in the file: do not requantize the file with llama-quantize "
                "(its float16 block scales would round it to zero)"]
    return []


def check_gguf_exportable(cfg) -> None:
    problems = gguf_problems(cfg)
    if problems:
        raise ConfigError(f"cannot export to GGUF ({gguf_architecture(cfg)} architecture): " + "; ".join(problems) +
                          "; keep the model in the kvlab format (kvlab export --format kvlab)")


def _pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (``tokenizer.ggml.pre``)."""
    def byte_level(s, regex):
        return s.get("type") == "ByteLevel" and bool(s.get("use_regex", True)) == regex

    steps = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec or {}]
    if len(steps) == 1 and byte_level(steps[0], True):
        return "gpt2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1], True)):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], False):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
    raise ConfigError(f"cannot export the tokenizer to GGUF: its pre-tokenizer ({json.dumps(spec)[:200]}) is none "
                      f"of those llama.cpp names that kvlab knows (gpt2, smollm, llama-bpe, qwen2)")


def _tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    if tokenizer is None or getattr(tokenizer, "kind", None) != "hf":
        raise ConfigError("cannot export to GGUF: the model has no HF tokenizer, and llama.cpp needs one in the file "
                          "(load the model from a directory or GGUF file that has one)")
    spec = json.loads(tokenizer.tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError("cannot export the tokenizer to GGUF: kvlab writes byte-level BPE tokenizers ('gpt2'); "
                          "this one is a SentencePiece-style tokenizer")
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    tokens = [None] * max(vocab_size, len(vocab))
    for token, i in vocab.items():
        tokens[i] = token
    types = [_NORMAL] * len(tokens)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    for i, t in enumerate(tokens):        # ids the embedding has but the vocabulary lacks (padded rows)
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    post = spec.get("post_processor") or {}
    adds_bos = post.get("type") == "TemplateProcessing" and any(
        "SpecialToken" in piece for piece in post.get("single", [])[:1])
    writer.add_add_bos_token(adds_bos)
    writer.add_add_space_prefix(False)
    for token, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                       (tokenizer.eos_token_id, writer.add_eos_token_id),
                       (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token is not None:
            add(token)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tensor(value: torch.Tensor, gguf_type: str):
    """``(array, raw_dtype)`` for ``GGUFWriter.add_tensor``: F32 for 1-D tensors (llama.cpp's rule)."""
    from gguf import GGMLQuantizationType, quants

    data = value.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or gguf_type == "f32":
        return data, None
    if gguf_type == "f16":
        return data.astype(np.float16), None
    if data.shape[-1] % 32:
        return data.astype(np.float16), None      # Q8_0 blocks are 32 wide: llama.cpp falls back too
    return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def check_gguf_target(path: Path) -> None:
    """Refuse a path that holds anything but a GGUF file kvlab wrote."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputExistsError(f"{path} exists and is not a GGUF file kvlab wrote; choose another path")
    if path.exists():
        from gguf import GGUFReader

        try:
            ours = MARKER_KEY in GGUFReader(str(path)).fields
        except Exception:  # gguf raises ValueError, struct.error... on files that are not GGUF
            ours = False
        if not ours:
            raise OutputExistsError(f"{path} exists and kvlab did not write it; choose another path (kvlab never "
                                    f"overwrites a file it did not write)")


def _llama_tensors(model: Transformer) -> dict[str, tuple[torch.Tensor, bool]]:
    """GGUF name -> (tensor, kept in F32) of a llama-architecture model: kvlab's names mapped, the
    rows of Q and K in llama.cpp's interleaved rotary order."""
    cfg, out = model.cfg, {}
    for name, value in without_key_balance(model.state_dict()).items():     # llama.cpp stores keys as projected
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            key = _TO_GGUF[f"layers.{{i}}.{rest}"].format(i=i)
        else:
            key = _TO_GGUF[name]
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            value = permute_rope_rows(value, cfg.n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            value = permute_rope_rows(value, cfg.n_kv_head)
        out[key] = (value, False)
    return out


def _deepseek2_metadata(writer, cfg) -> None:
    """The hyper-parameters of a dense deepseek2 model (every block dense, no query compression unless
    the model has one); llama.cpp requires the expert keys even then."""
    from kvlab.attention.mla import MLAShape

    shape = MLAShape.of(cfg)
    writer.add_head_count_kv(1)               # one latent + RoPE key per token, read by every head
    writer.add_rope_dimension_count(shape.qk_rope_head_dim)
    writer.add_q_lora_rank(shape.q_lora_rank or 0)
    writer.add_kv_lora_rank(shape.kv_lora_rank)
    writer.add_key_length(shape.kv_lora_rank + shape.qk_rope_head_dim)   # what its cache holds per token
    writer.add_value_length(shape.kv_lora_rank)
    writer.add_key_length_mla(shape.qk_nope_head_dim + shape.qk_rope_head_dim)
    writer.add_value_length_mla(shape.v_head_dim)
    writer.add_leading_dense_block_count(cfg.n_layer)
    writer.add_expert_feed_forward_length(cfg.d_ff)
    writer.add_expert_shared_count(0)


def _rope_pairs(rows: torch.Tensor) -> torch.Tensor:
    """One RoPE block's rows, half-split -> adjacent pairs (llama.cpp's deepseek2 rotates pairs)."""
    return permute_rope_rows(rows, 1)


def _deepseek2_tensors(model: Transformer) -> dict[str, tuple[torch.Tensor, bool]]:
    """GGUF name -> (tensor, kept in F32) of an MLA model as llama.cpp's deepseek2 (module docstring)."""
    from kvlab.attention.mla import MLAShape

    cfg = model.cfg
    shape = MLAShape.of(cfg)
    H, rank, R = cfg.n_head, shape.kv_lora_rank, shape.qk_rope_head_dim
    N, V = shape.qk_nope_head_dim, shape.v_head_dim
    state = model.state_dict()
    unused = set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    sd = _Taken(state, unused)

    def with_rope_pairs(w: torch.Tensor) -> torch.Tensor:      # the last R rows of each head's query
        w = w.reshape(H, N + R, -1).clone()
        w[:, N:] = torch.stack([_rope_pairs(w[h, N:]) for h in range(H)])
        return w.reshape(H * (N + R), -1)

    out = {"token_embd.weight": (sd["embed_tokens.weight"], False), "output_norm.weight": (sd["norm.weight"], False)}
    if not cfg.tie_embeddings:
        out["output.weight"] = (sd["lm_head.weight"], False)
    for i in range(cfg.n_layer):
        p, b = f"layers.{i}.", f"blk.{i}."
        attn = p + "self_attn."
        out[b + "attn_norm.weight"] = (sd[p + "input_layernorm.weight"], False)
        if shape.q_lora_rank is None:
            out[b + "attn_q.weight"] = (with_rope_pairs(sd[attn + "q_proj.weight"]), False)
        else:
            out[b + "attn_q_a.weight"] = (sd[attn + "q_a_proj.weight"], False)
            out[b + "attn_q_a_norm.weight"] = (sd[attn + "q_a_layernorm.weight"], False)
            out[b + "attn_q_b.weight"] = (with_rope_pairs(sd[attn + "q_b_proj.weight"]), False)
        kv_a = sd[attn + "kv_a_proj_with_mqa.weight"].double()      # float64 for the scaling below
        kv_a[rank:] = _rope_pairs(kv_a[rank:])
        if shape.latent_norm:
            norm, keep_f32 = sd[attn + "kv_a_layernorm.weight"], False
        else:        # llama.cpp's latent RMSNorm made linear through its epsilon (module docstring)
            eps = cfg.norm_eps
            x_bound = cfg.d_model ** 0.5 * float(sd[p + "input_layernorm.weight"].abs().max())
            c_bound = float(torch.linalg.matrix_norm(kv_a[:rank], ord=2)) * x_bound
            s = 2.0 ** math.floor(math.log2(math.sqrt(eps * 2.0 ** -24 * rank) / max(c_bound, 1e-30)))
            kv_a[:rank] *= s
            norm, keep_f32 = torch.full((rank,), math.sqrt(eps) / s, dtype=torch.float64), True
        out[b + "attn_kv_a_mqa.weight"] = (kv_a, keep_f32)
        out[b + "attn_kv_a_norm.weight"] = (norm, False)
        kv_b = sd[attn + "kv_b_proj.weight"].view(H, N + V, rank)
        out[b + "attn_k_b.weight"] = (kv_b[:, :N].transpose(1, 2).contiguous(), False)   # (H, rank, N)
        out[b + "attn_v_b.weight"] = (kv_b[:, N:].contiguous(), False)                   # (H, V, rank)
        out[b + "attn_output.weight"] = (sd[attn + "o_proj.weight"], False)
        out[b + "ffn_norm.weight"] = (sd[p + "post_attention_layernorm.weight"], False)
        for leaf, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            out[b + name + ".weight"] = (sd[p + "mlp." + leaf + ".weight"], False)
    if unused:          # a weight the architecture has no place for would be lost: refuse instead
        raise ConfigError(f"cannot export to GGUF (deepseek2 architecture): no place for {sorted(unused)[:4]}; "
                          f"keep the model in the kvlab format (kvlab export --format kvlab)")
    return out


class _Taken:
    """A state dict read as float32 one tensor at a time, each key crossed off ``unused`` when read."""

    def __init__(self, state: dict, unused: set):
        self.state, self.unused = state, unused

    def __getitem__(self, key: str) -> torch.Tensor:
        self.unused.discard(key)
        return self.state[key].detach().to(torch.float32)


def export_gguf(model: Transformer, path: str | Path, *, gguf_type: str = "f16") -> Path:
    """Write ``model`` (a llama-family GQA/MQA model, or an MLA one, with an HF byte-level BPE
    tokenizer) as one GGUF file of llama.cpp's ``llama`` or ``deepseek2`` architecture with
    ``gguf_type`` weights (``f32``, ``f16`` or ``q8_0``)."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"gguf_type={gguf_type!r} is not one of {list(GGUF_TYPES)}")
    refuse_adapter(model)
    cfg = model.cfg
    check_gguf_exportable(cfg)
    path = Path(path)
    check_gguf_target(path)
    created = make_parents(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    arch = gguf_architecture(cfg)
    try:
        tensors = _llama_tensors(model) if arch == "llama" else _deepseek2_tensors(model)
        writer = GGUFWriter(str(tmp), arch)
        writer.add_name(cfg.name or "kvlab model")
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_head)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        if arch == "llama":
            writer.add_head_count_kv(cfg.n_kv_head)
            writer.add_rope_dimension_count(cfg.head_dim)
            if cfg.head_dim * cfg.n_head != cfg.d_model:
                writer.add_key_length(cfg.head_dim)
                writer.add_value_length(cfg.head_dim)
        else:
            _deepseek2_metadata(writer, cfg)
        writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                              "q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        writer.add_quantization_version(GGML_QUANT_VERSION)
        writer.add_bool(MARKER_KEY, True)
        _tokenizer_metadata(writer, model.tokenizer, cfg.vocab_size)
        for key, (value, keep_f32) in tensors.items():
            data, raw = _tensor(value, "f32" if keep_f32 else gguf_type)
            writer.add_tensor(key, data, raw_dtype=raw)         # Q8_0: bytes; gguf infers the shape
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        apply_umask(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_empty(created)
        raise
    return path

"""GGUF export (llama architecture) through the ``gguf`` package, so that a shrunk GQA/MQA model
runs in llama.cpp and Ollama.

llama.cpp's conventions, as its ``convert_hf_to_gguf.py`` writes them and :mod:`kvlab.io.gguf`
reads them back: tensor names ``token_embd`` / ``blk.N.attn_q`` ..., the rows of Q and K permuted
so that rotary pairs are interleaved (:func:`permute_rope_rows`, the inverse of the importer's),
1-D tensors (norms, biases) always F32, the hyper-parameters under ``llama.*``, and the tokenizer
as ``tokenizer.ggml.*`` metadata: the vocabulary in id order, each token's type (control for
special added tokens, user-defined for the other added ones), the BPE merges, llama.cpp's name for
the pre-tokenizer, the special token ids and the chat template.

Weights are written as F32, F16 or Q8_0 (``gguf.quants``). A file kvlab writes carries
``kvlab.exported``; an existing path is replaced only when it is such a file (written to a
temporary sibling and renamed over it), never a file of the user's.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from kvlab.errors import ConfigError
from kvlab.io.atomic import OutputExistsError, apply_umask, make_parents, remove_empty
from kvlab.io.gguf import _GLOBAL_NAMES, _LAYER_NAMES, _LLAMA3_SPLIT, _QWEN2_SPLIT
from kvlab.io.weights import refuse_adapter
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


def gguf_problems(cfg) -> list[str]:
    """Why ``cfg`` is not a llama-architecture GGUF model (empty if it is)."""
    problems = []
    if cfg.is_encoder_decoder:
        problems.append("an encoder–decoder (llama.cpp's llama architecture is decoder-only; export it as HF T5)")
    if cfg.attention_layers is not None or cfg.attn_kind != "gqa":
        problems.append(f"the {cfg.attn_kind!r} attention kind / per-layer attention specs (llama.cpp's llama "
                        f"architecture is softmax GQA in every layer)")
    if cfg.n_kv_layers != cfg.n_layer:
        problems.append("Cross-Layer Attention (llama.cpp's llama architecture has a KV cache per layer)")
    for bad, what in ((cfg.pos != "rope", f"{cfg.pos} positions"), (cfg.block != "sequential", "parallel blocks"),
                      (cfg.mlp != "swiglu", f"a {cfg.mlp} MLP"), (cfg.norm != "rmsnorm", "LayerNorm"),
                      (cfg.sliding_window is not None, "a sliding window (llama.cpp's llama architecture "
                                                        "attends to the whole context)"),
                      (cfg.attention_sinks, "attention sinks"), (cfg.block_sparse is not None, "a block-sparse layout"),
                      (bool(cfg.score_outputs), "a score head (a reward model; llama.cpp's llama models are "
                                                "language models)")):
        if bad:
            problems.append(what)
    return problems


def check_gguf_exportable(cfg) -> None:
    problems = gguf_problems(cfg)
    if problems:
        raise ConfigError("cannot export to GGUF (llama architecture): " + "; ".join(problems) +
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


def export_gguf(model: Transformer, path: str | Path, *, gguf_type: str = "f16") -> Path:
    """Write ``model`` (a llama-family GQA/MQA model with an HF byte-level BPE tokenizer) as one
    llama-architecture GGUF file of ``gguf_type`` weights (``f32``, ``f16`` or ``q8_0``)."""
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
    try:
        writer = GGUFWriter(str(tmp), "llama")
        writer.add_name(cfg.name or "kvlab model")
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.n_kv_head)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim * cfg.n_head != cfg.d_model:
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                              "q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        writer.add_quantization_version(GGML_QUANT_VERSION)
        writer.add_bool(MARKER_KEY, True)
        _tokenizer_metadata(writer, model.tokenizer, cfg.vocab_size)
        for name, value in model.state_dict().items():
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
            data, raw = _tensor(value, gguf_type)
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

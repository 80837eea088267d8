"""GGUF import (llama architecture) through the ``gguf`` package.

Every tensor type gguf-py can dequantize is read (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the
K-quants...). llama.cpp's converter permutes the rows of Q and K so that rotary pairs are
interleaved; we undo that to get HF's half-split layout. Hyperparameters and the tokenizer
(vocabulary, merges, special tokens, chat template) come from the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvlab.config.model import ModelConfig
from kvlab.errors import CheckpointError, ConfigError
from kvlab.io.provenance import new_provenance
from kvlab.io.weights import build_model
from kvlab.models.decoder import Transformer

# GGUF tensor name -> kvlab name; "{i}" is the layer index.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}

# How each llama.cpp pre-tokenizer splits text before byte-level BPE (llama-vocab.cpp's
# regex_exprs). "digits+gpt2" splits every digit apart, then applies GPT-2's regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "command-r": "digits+gpt2", "codeshell": "digits+gpt2",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3",
    "qwen2": "qwen2",
}


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of Q/K rows (pairs interleaved -> halves), per head."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class _Meta:
    def __init__(self, reader, where: str):
        self.fields, self.where = reader.fields, where

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise CheckpointError(f"{self.where}: metadata key {key!r} is missing")
        return self.get(key)


def _config(meta: _Meta, tensor_names: set[str]) -> ModelConfig:
    arch = meta.require("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{meta.where}: architecture {arch!r} is not supported; kvlab imports GGUF files "
                              f"of the 'llama' architecture (Llama, Mistral, SmolLM, TinyLlama...)")
    if "rope_freqs.weight" in tensor_names or meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise CheckpointError(f"{meta.where}: RoPE frequency scaling (e.g. Llama 3.1's) is not supported yet")
    n_head = meta.require(f"{arch}.attention.head_count")
    d_model = meta.require(f"{arch}.embedding_length")
    head_dim = meta.get(f"{arch}.rope.dimension_count") or meta.get(f"{arch}.attention.key_length") or d_model // n_head
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(f"{meta.where}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    window = meta.get(f"{arch}.attention.sliding_window")
    try:
        return ModelConfig(
            vocab_size=int(vocab), d_model=int(d_model), n_layer=int(meta.require(f"{arch}.block_count")),
            n_head=int(n_head), n_kv_head=int(meta.get(f"{arch}.attention.head_count_kv") or n_head),
            head_dim=int(head_dim), mlp="swiglu", d_ff=int(meta.require(f"{arch}.feed_forward_length")),
            norm="rmsnorm", norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            pos="rope", rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names, o_bias="blk.0.attn_output.bias" in tensor_names,
            sliding_window=int(window) if window else None,
            max_seq_len=int(meta.get(f"{arch}.context_length", 2048)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), name=meta.get("general.name"))
    except ConfigError as e:
        raise CheckpointError(f"{meta.where}: {e}") from None


def _dequantize(tensor, where: str) -> torch.Tensor:
    from gguf import quants

    try:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"{where}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf "
                              f"{_gguf_version()} cannot dequantize") from None
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"{where}: tensor {tensor.name} ({tensor.tensor_type.name}) cannot be decoded: {e}; "
                              f"the file is corrupt or truncated") from None
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))      # GGML lists dims innermost first
    # A copy: the reader memory-maps the file read-only.
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces of
    the vocabulary, ranked by the score of the merged piece (SentencePiece merges the pair whose
    result scores highest first), ties by the ids of the halves."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[pid], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(meta: _Meta):
    """An HF ``tokenizers`` tokenizer from the GGUF tokenizer metadata: byte-level BPE ('gpt2')
    or SentencePiece BPE with byte fallback ('llama', as in Llama 2 and TinyLlama)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTok

    from kvlab.io.tokenizer import HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        return None
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        split = _PRE_TOKENIZERS.get(pre)
        if split is None:
            raise CheckpointError(f"{meta.where}: pre-tokenizer {pre!r} is not supported; supported: "
                                  f"{sorted(_PRE_TOKENIZERS)}")
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tok = HFTok(models.BPE(vocab=vocab, merges=merges, ignore_merges=split == "llama3"))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in ("gpt2", "digits+gpt2"))
        if split == "gpt2":
            tok.pre_tokenizer = byte_level
        elif split == "digits+gpt2":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            pattern = _LLAMA3_SPLIT if split == "llama3" else _QWEN2_SPLIT
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                         byte_level])
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError(f"{meta.where}: a SentencePiece tokenizer needs tokenizer.ggml.scores")
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = (tokens[unk_id] if unk_id is not None
               else next((t for t, ty in zip(tokens, types) if ty == _UNKNOWN), None))
        tok = HFTok(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk,
                               byte_fallback=True, fuse_unk=True))
        # SentencePiece writes spaces as "▁" and, with add_space_prefix, starts text with one;
        # llama.cpp adds that prefix to each text fragment between special tokens, as this does.
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(" ", 1, 0)] if prefix else [])])
        add_bos_default = True
    else:
        raise CheckpointError(f"{meta.where}: tokenizer model {kind!r} is not supported (kvlab builds byte-level "
                              f"BPE, 'gpt2', and SentencePiece BPE, 'llama', tokenizers from GGUF metadata)")
    # CONTROL tokens (special, kept whole, e.g. <|im_start|>, <s>) and USER_DEFINED ones (kept whole).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def name(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = name("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    return HFTokenizer(tok, bos_token=bos, eos_token=name("tokenizer.ggml.eos_token_id"),
                       pad_token=name("tokenizer.ggml.padding_token_id"),
                       chat_template=meta.get("tokenizer.chat_template"))


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, struct.error, IndexError... on bad files
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be corrupt "
                              f"or truncated") from None


def read_gguf_config(path: str | Path) -> ModelConfig:
    reader = _open(Path(path))
    return _config(_Meta(reader, str(path)), {t.name for t in reader.tensors})


def import_gguf(path: str | Path, *, dtype: torch.dtype | None = torch.float32,
                device: str | torch.device = "cpu") -> Transformer:
    """Load a llama-architecture GGUF file, dequantizing every tensor to float32 (then ``dtype``)."""

    path = Path(path)
    where = str(path)
    reader = _open(path)
    meta = _Meta(reader, where)
    names = {t.name for t in reader.tensors}
    cfg = _config(meta, names)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name in _GLOBAL_NAMES:
            key = _GLOBAL_NAMES[tensor.name]
        else:
            parts = tensor.name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                raise CheckpointError(f"{where}: tensor {tensor.name!r} is not part of a llama model kvlab knows")
            key = f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
        value = _dequantize(tensor, where)
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            value = unpermute_rope_rows(value, cfg.n_head)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            value = unpermute_rope_rows(value, cfg.n_kv_head)
        state[key] = value
    model = build_model(cfg, state, where=where, device=device, dtype=dtype)
    model.tokenizer = build_tokenizer(meta)
    model.provenance = new_provenance("gguf", path=str(path.resolve()), file_type=meta.get("general.file_type"),
                                      name=meta.get("general.name"))
    return model

"""The encoder–decoder (T5; the GQA paper's setting): a bidirectional encoder over the source and a
decoder whose layers add cross-attention to the encoder's output.

The decoder is kvlab's decoder LM (:class:`~kvlab.models.decoder.Transformer`: causal
self-attention of any ``n_kv_head`` and CLA, its KV cache, RoPE or T5's relative bias) with one
more sub-layer per block — pre-norm cross-attention (:mod:`kvlab.attention.cross`, its own
``cross_n_kv_head`` and ``cross_cla``) between self-attention and the MLP, as T5 places it. The
encoder is the same pre-norm block over an MHA config (:meth:`ModelConfig.encoder_config`) run
without the causal rule, with padding masks and its own bidirectional relative bias; its K/V are
never cached, so they stay MHA. Embeddings are shared by encoder, decoder (and a tied LM head).

Parameter names: the decoder's are the decoder LM's (``layers.N.self_attn.*``, ``layers.N.cross_attn.*``,
``layers.N.cross_attn_layernorm``), the encoder's ``encoder.layers.N.*``, ``encoder.norm`` and
``encoder.embed_relative``; :mod:`kvlab.io.t5` maps them onto HF's T5 names.

Positions count real tokens (as everywhere in kvlab), so left- and right-padded sources give the
same result; HF's T5 counts padding in its relative positions, which agrees for right padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvlab.attention.bias import T5RelativeBias
from kvlab.attention.context import ForwardContext
from kvlab.attention.cross import CrossAttention
from kvlab.cache.cross import CrossKV, Seq2SeqCache
from kvlab.config.model import ModelConfig
from kvlab.dtypes import KVQuant, parse_kv_quant
from kvlab.errors import ConfigError
from kvlab.layers.norms import make_norm
from kvlab.layers.positions import positions_from_attention_mask
from kvlab.layers.rope import rope_cos_sin
from kvlab.models.decoder import Block, Transformer


@dataclass
class Memory:
    """The encoder's output: final-norm hidden states ``(B, S, d_model)`` and the source's validity."""

    hidden: torch.Tensor
    valid: torch.Tensor | None


class DecoderBlock(Block):
    """``x + self_attn(n1(x))``, then ``+ cross_attn(n2(x))``, then ``+ mlp(n3(x))``."""

    ATTENTION = ("self_attn", "cross_attn")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.cross_attn_layernorm = make_norm(cfg)
        self.cross_attn = CrossAttention(cfg, layer_idx)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        x = x + self.cross_attn(self.cross_attn_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Encoder(nn.Module):
    """The bidirectional stack: ``n_encoder_layer`` pre-norm blocks and a final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.encoder_config()
        if cfg.pos == "t5":
            self.embed_relative = T5RelativeBias(cfg.n_head, cfg.relative_buckets, cfg.relative_max_distance,
                                                 bidirectional=True)
        self.layers = nn.ModuleList(Block(self.cfg, i) for i in range(self.cfg.n_layer))
        self.norm = make_norm(self.cfg)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, backend: str,
                inv_freq: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x.shape
        pos = (positions_from_attention_mask(valid) if valid is not None
               else torch.arange(S, device=x.device).unsqueeze(0))
        bias = getattr(self, "embed_relative", None)
        # Every real token sees every real token: no mask at all unless padding or a positional bias
        # (which a backend evaluates from the mask's positions) needs one.
        ctx = ForwardContext(backend, pos, pos, q_valid=valid, k_valid=valid, causal=False,
                             all_visible=valid is None and bias is None, score_bias=bias)
        if inv_freq is not None:
            ctx.rope_inv_freq = inv_freq
            ctx.cos, ctx.sin = rope_cos_sin(pos, inv_freq, x.dtype)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)


class EncoderDecoder(Transformer):
    """An encoder–decoder built from a :class:`ModelConfig` with ``n_encoder_layer > 0``.

    ``model(src, tgt)`` returns the decoder's logits ``(B, T, vocab)`` for target inputs ``tgt``
    (teacher forcing: they start with ``decoder_start_token_id``); ``src_mask``/``tgt_mask`` mark real
    tokens. With ``cache=model.new_cache(B, max_len)`` the first call encodes ``src`` and keeps its
    cross-attention K/V in the cache; later calls pass ``src=None`` and append target tokens.
    """

    block_class = DecoderBlock

    def __init__(self, cfg: ModelConfig):
        if not cfg.is_encoder_decoder:
            raise ConfigError("EncoderDecoder needs a config with n_encoder_layer > 0; a decoder-only config "
                              "builds a kvlab.models.Transformer")
        super().__init__(cfg)

    def build_extra_modules(self, cfg: ModelConfig) -> None:
        self.encoder = Encoder(cfg)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None, kv_quant: str | KVQuant | None = None) -> Seq2SeqCache:
        """The decoder's self-attention cache for ``max_len`` target tokens, with room for the
        source's cross-attention K/V (filled by the first call)."""
        return Seq2SeqCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, dtype=dtype or self.dtype,
                            device=device or self.device, kv_quant=parse_kv_quant(kv_quant))

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
               backend: str | None = None) -> Memory:
        """Run the encoder over ``src (B, S)``."""
        if src.dim() != 2 or src.dtype not in (torch.long, torch.int32, torch.int64):
            raise ConfigError(f"src must be an integer tensor of shape (batch, seq), got {tuple(src.shape)} "
                              f"{src.dtype}")
        if src.shape[1] == 0:
            raise ConfigError("src is empty; an encoder–decoder needs at least one source token per row")
        valid = None
        if src_mask is not None:
            if src_mask.shape != src.shape:
                raise ConfigError(f"src_mask has shape {tuple(src_mask.shape)} but src has {tuple(src.shape)}; "
                                  f"give one 0/1 flag per source token")
            valid = src_mask.bool()
            if not bool(valid.any(dim=1).all()):
                raise ConfigError("a source row is all padding; every row needs at least one real token")
            if bool(valid.all()):
                valid = None
        inv_freq = self.rope_inv_freq(src.device) if self.cfg.pos == "rope" else None
        hidden = self.encoder(self.embed_tokens(src), valid, backend or self.cfg.attn_backend, inv_freq)
        return Memory(hidden, valid)

    def cross_kv(self, memory: Memory) -> CrossKV:
        """The cross-attention K/V of every producer layer, projected once from the encoder's output."""
        return CrossKV({i: self.layers[i].cross_attn.project(memory.hidden) for i in self.cfg.cross_kv_producers},
                       memory.valid)

    def forward(self, src: torch.Tensor | None, tgt: torch.Tensor, *, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None, cache: Seq2SeqCache | None = None,
                memory: Memory | None = None, backend: str | None = None,
                logits_to_keep: int | None = None) -> torch.Tensor:
        """Logits of the target positions (the last ``logits_to_keep`` ones when given). The source
        comes as tokens ``src``, as an encoded ``memory``, or from ``cache`` when it already holds one."""
        h = self.decoder_states(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask, cache=cache, memory=memory,
                                backend=backend)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        if self.cfg.output_scale != 1.0:
            h = h * self.cfg.output_scale
        return self.lm_head(h)

    def decoder_states(self, src: torch.Tensor | None, tgt: torch.Tensor, *, src_mask: torch.Tensor | None = None,
                       tgt_mask: torch.Tensor | None = None, cache: Seq2SeqCache | None = None,
                       memory: Memory | None = None, backend: str | None = None) -> torch.Tensor:
        """The decoder's final-norm hidden states ``(B, T, d_model)``."""
        if self.prompt_adapter is not None:
            raise ConfigError("prompt adapters (prefix / prompt tuning) are not supported on encoder–decoders yet")
        if cache is not None and not isinstance(cache, Seq2SeqCache):
            raise ConfigError("an encoder–decoder's cache comes from model.new_cache(...) (a Seq2SeqCache)")
        held = cache.cross if cache is not None else None
        given = [name for name, value in (("src", src), ("memory", memory)) if value is not None]
        if held is not None and given:
            raise ConfigError(f"the cache already holds its source's K/V; pass {given[0]}=None to go on decoding "
                              f"(or cache.reset() for a new source)")
        if held is None and len(given) != 1:
            raise ConfigError("give the source once: src (tokens) or memory (model.encode(src)), not "
                              + ("both" if given else "neither"))
        cross = held
        if cross is None:
            memory = memory if memory is not None else self.encode(src, src_mask, backend)
            if memory.hidden.shape[0] != tgt.shape[0]:
                raise ConfigError(f"the source has {memory.hidden.shape[0]} rows but tgt has {tgt.shape[0]}; "
                                  f"give one source per target row")
            cross = self.cross_kv(memory)
            if cache is not None:
                cache.cross = cross
        return self.hidden_states(tgt, attention_mask=tgt_mask, cache=cache, backend=backend, cross=cross)


def model_class(cfg: ModelConfig) -> type[Transformer]:
    """The model class a config describes: :class:`EncoderDecoder` when it has an encoder, else the
    decoder LM (``model_class(cfg)(cfg)`` builds it)."""
    return EncoderDecoder if cfg.is_encoder_decoder else Transformer

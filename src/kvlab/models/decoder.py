"""The decoder-only LM: embeddings, sequential or parallel blocks, final norm, LM head.

Parameter names follow HF Llama (``embed_tokens``, ``layers.N.self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``...) so that checkpoints map onto each other name for name. Each block's
attention is built by its layer's registered kind (:mod:`kvlab.registry`); the model knows nothing
about any kind beyond that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.attention.bias import AlibiBias, T5RelativeBias
from kvlab.attention.context import ForwardContext
from kvlab.cache.cache import KVCache
from kvlab.config.model import ModelConfig
from kvlab.dtypes import KVQuant, parse_kv_quant
from kvlab.errors import ConfigError
from kvlab.layers.mlp import MLP
from kvlab.layers.norms import make_norm
from kvlab.layers.positions import positions_from_attention_mask, positions_in_segments
from kvlab.layers.rope import rope_cos_sin, rope_inv_freq
from kvlab.models.heads import last_real_token
from kvlab.registry import get_kind


@dataclass
class InputEntry:
    """What an input hook (a prompt adapter) does to one forward call: new input embeddings and
    mask, ``n_virtual`` leading positions to drop from the output (virtual input tokens), and
    ``prefix``: per KV-producing layer, entries the layer places before this call's own keys (a call
    without a cache; with a cache the hook writes them into the cache instead)."""

    x: torch.Tensor
    attention_mask: torch.Tensor | None
    n_virtual: int = 0
    prefix: dict[int, tuple[torch.Tensor, ...]] | None = None

    @property
    def prefix_len(self) -> int:
        return 0 if not self.prefix else next(iter(self.prefix.values()))[0].shape[2]


class Block(nn.Module):
    """Sequential pre-norm ``h = x + attn(n1(x)); h + mlp(n2(h))`` or parallel
    ``x + attn(n(x)) + mlp(n(x))`` with one shared norm (GPT-J / PaLM).

    A parallel block computes the attention's input projections (q, k, v) and the MLP's (gate, up)
    in one matmul, as PaLM does — the source of its training speed — when both modules expose
    ``input_projections()`` and those are plain ``nn.Linear`` (an adapter wrapping one, e.g. LoRA,
    falls back to separate matmuls). The weights stay separate parameters, so checkpoints, exports
    and adapters see the same names as in a sequential block."""

    # The block's attention sub-layers (a subclass that adds one names it too: an encoder–decoder's
    # DecoderBlock adds its cross-attention). Trainable sets read them through attention_modules()
    # (Transformer.parameter_groups).
    ATTENTION: tuple[str, ...] = ("self_attn",)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.parallel = cfg.block == "parallel"
        self.input_layernorm = make_norm(cfg)
        self.self_attn = get_kind(cfg.layer_specs[layer_idx].kind).module(cfg, layer_idx)
        if not self.parallel:
            self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def _fused_projections(self, h: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The attention's and the MLP's input projections of ``h`` from one matmul, or None."""
        if not hasattr(self.self_attn, "input_projections"):
            return None
        attn_in, mlp_in = self.self_attn.input_projections(), self.mlp.input_projections()
        mods = attn_in + mlp_in
        if any(type(m) is not nn.Linear for m in mods):
            return None
        weight = torch.cat([m.weight for m in mods])
        bias = None
        if any(m.bias is not None for m in mods):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
        out = list(F.linear(h, weight, bias).split([m.out_features for m in mods], dim=-1))
        return out[:len(attn_in)], out[len(attn_in):]

    def attention_modules(self) -> list[nn.Module]:
        """The attention sub-layers this block has (see ``ATTENTION``)."""
        return [getattr(self, name) for name in self.ATTENTION]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.parallel:
            fused = self._fused_projections(h)
            if fused is None:
                return x + self.self_attn(h, ctx) + self.mlp(h)
            return x + self.self_attn(h, ctx, projected=fused[0]) + self.mlp(h, projected=fused[1])
        x = x + self.self_attn(h, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A decoder LM built from a :class:`ModelConfig`.

    ``model(tokens)`` returns logits ``(B, T, vocab)``. ``attention_mask (B, T)`` marks real
    tokens (1) and padding (0), left or right. ``model(tokens, cache=cache)`` appends the tokens
    to the KV cache and returns the logits of the new tokens. ``backend`` overrides
    ``cfg.attn_backend`` for one call.

    What travels with a model is declared here: ``tokenizer`` (or None), ``provenance`` (the
    record of :mod:`kvlab.io.provenance`), ``adapter_spec`` (the attached :mod:`kvlab.peft`
    adapter's spec) and ``prompt_adapter`` (an input hook: prefix / P-tuning v2 / prompt tuning),
    each None until set.
    """

    tokenizer: Any
    provenance: dict | None
    adapter_spec: Any
    prompt_adapter: nn.Module | None
    block_class: type[nn.Module] = Block       # an encoder–decoder's blocks add cross-attention

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.is_encoder_decoder and type(self) is Transformer:
            raise ConfigError(f"the config has an encoder (n_encoder_layer={cfg.n_encoder_layer}); build it with "
                              f"kvlab.models.EncoderDecoder (kvlab.models.model_class(cfg) picks the class)")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        # ALiBi: a fixed distance penalty per head, added to the scores (no parameters, not saved).
        self.alibi = AlibiBias(cfg.n_head) if cfg.pos == "alibi" else None
        # T5: a learned bias per (relative-position bucket, head), shared by every layer.
        if cfg.pos == "t5":
            self.embed_relative = T5RelativeBias(cfg.n_head, cfg.relative_buckets, cfg.relative_max_distance)
        self.layers = nn.ModuleList(self.block_class(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.score_outputs:      # a reward model's head, read at the last real token (sequence_scores)
            self.score = nn.Linear(cfg.d_model, cfg.score_outputs, bias=False)
        self.build_extra_modules(cfg)
        # RoPE frequencies live outside the module state, in float32, so that model.to(bf16) or
        # loading from the meta device can never degrade them.
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.tokenizer = None
        self.provenance = None
        self.adapter_spec = None
        self.prompt_adapter = None
        self.reset_parameters()

    def build_extra_modules(self, cfg: ModelConfig) -> None:
        """Where a subclass adds modules of its own (an encoder) before the parameters are initialised."""

    def rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta).to(device)
        return self._inv_freq[device]

    # ------------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2·n_layer)."""
        std = 0.02
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The model's parameters in named groups, read from its structure; the trainable sets of
        :mod:`kvlab.training` are unions of them.

        ``attention``: every attention sub-layer (:meth:`Block.attention_modules`: the decoder's
        self-attention and, in an encoder–decoder, its cross-attention and the encoder's);
        ``kv``: the decoder's K/V projections — the ``k_proj``/``v_proj`` of its attention
        sub-layers, what a KV conversion changes (a kind that keeps K/V otherwise, MLA's latents or
        low-rank factors, has none); ``score``: the score head, if any; ``model``: every parameter.
        Tensors an adapter adds inside these modules (LoRA's factors) are in them too: the adapter
        declares those (:func:`kvlab.peft.adapter.adapter_groups`)."""
        blocks = [m for m in self.modules() if isinstance(m, Block)]
        attention = [m for block in blocks for m in block.attention_modules()]
        kv = [getattr(m, leaf) for block in self.layers for m in block.attention_modules()
              for leaf in ("k_proj", "v_proj") if hasattr(m, leaf)]
        score = [self.score] if hasattr(self, "score") else []
        return {"model": list(self.parameters()), "attention": _parameters_of(attention), "kv": _parameters_of(kv),
                "score": _parameters_of(score)}

    def param_counts(self) -> dict[str, int]:
        """Real counts by the same parts as :meth:`ModelConfig.param_counts` (tied weights once)."""
        seen: set[int] = set()
        attention = {id(p) for p in self.parameter_groups()["attention"]}
        counts = dict.fromkeys(("embedding", "attention", "mlp", "norm", "lm_head"), 0)
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            part = ("embedding" if "embed_" in name else "lm_head" if name.startswith("lm_head")
                    else "attention" if id(p) in attention else "mlp" if ".mlp." in name else "norm")
            counts[part] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def n_virtual_tokens(self) -> int:
        """Cache slots a prompt adapter takes before the first real token (0 without one)."""
        return self.prompt_adapter.n_tokens if self.prompt_adapter is not None else 0

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None, kv_quant: str | KVQuant | None = None) -> KVCache:
        """A preallocated KV cache for ``batch_size`` rows of up to ``max_len`` tokens; ``kv_quant``
        (``'fp8'``, ``'int8'``, ``'int4'``, or keys/values ``'int8/int4'``) keeps its per-token entries quantized."""
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len,
                       dtype=dtype or self.dtype, device=device or self.device, kv_quant=parse_kv_quant(kv_quant))

    # --------------------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, backend: str | None = None,
                logits_to_keep: int | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, vocab)``; with ``logits_to_keep=n`` only those of the last n positions
        (generation needs one: the LM head over a long prompt is a large share of prefill).
        ``segment_ids`` ``(B, T)`` (packed rows, no cache): tokens attend only within their
        segment, whose positions restart at 0; id 0 marks padding."""
        h = self.hidden_states(tokens, attention_mask=attention_mask, cache=cache, backend=backend,
                               segment_ids=segment_ids)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    def sequence_scores(self, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                        backend: str | None = None) -> torch.Tensor:
        """``(B, score_outputs)``: the score head at each row's last real token (a reward model;
        :func:`kvlab.models.heads.last_real_token`: the pad token is not read, as in transformers)."""
        if not self.cfg.score_outputs:
            raise ConfigError("this model has no score head; add one with kvlab.models.heads.add_score_head")
        h = self.hidden_states(tokens, attention_mask=attention_mask, backend=backend)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return self.score(h[rows, last_real_token(tokens, attention_mask, self.cfg.pad_token_id)])

    def hidden_states(self, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None, backend: str | None = None,
                      segment_ids: torch.Tensor | None = None, cross=None) -> torch.Tensor:
        """The final-norm hidden states ``(B, T, d_model)`` (what the LM head reads); ``cross``: the
        source K/V an encoder–decoder's cross-attention reads (:class:`kvlab.cache.cross.CrossKV`)."""
        cfg = self.cfg
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ConfigError(f"tokens must be an integer tensor of shape (batch, seq), got "
                              f"{tuple(tokens.shape)} {tokens.dtype}")
        B = tokens.shape[0]
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)} but tokens have "
                              f"{tuple(tokens.shape)}; give one 0/1 flag per token")
        if cache is not None and cache.batch_size != B:
            raise ConfigError(f"the cache was allocated for batch_size={cache.batch_size} but tokens "
                              f"have batch {B}; allocate model.new_cache({B}, ...)")

        if segment_ids is not None:
            if segment_ids.shape != tokens.shape:
                raise ConfigError(f"segment_ids has shape {tuple(segment_ids.shape)} but tokens have "
                                  f"{tuple(tokens.shape)}; give one segment id per token")
            if cache is not None or attention_mask is not None or self.prompt_adapter is not None:
                raise ConfigError("segment_ids (packed rows) go without a cache, an attention_mask or a prompt "
                                  "adapter; for prefix/prompt tuning turn packing off")

        x = self.embed_tokens(tokens)
        # A prompt adapter enters once per sequence: on a call without a cache, or on the first
        # call into an empty cache (which then keeps its prefix). See kvlab.peft.prefix.
        entry = InputEntry(x, attention_mask)
        if self.prompt_adapter is not None and (cache is None or cache.is_empty):
            entry = self.prompt_adapter.enter(x, attention_mask, cache)
        x, attention_mask, prefix_len = entry.x, entry.attention_mask, entry.prefix_len
        T = x.shape[1]
        ctx = self._context(tokens, T, attention_mask, cache, segment_ids, prefix_len,
                            backend or cfg.attn_backend)
        ctx.prefix = entry.prefix
        ctx.cross = cross
        if cfg.pos == "learned":
            x = x + self.embed_positions(ctx.q_pos)
        elif cfg.pos == "rope":
            ctx.rope_inv_freq = self.rope_inv_freq(x.device)
            ctx.cos, ctx.sin = rope_cos_sin(ctx.q_pos, ctx.rope_inv_freq, x.dtype)
        for layer in self.layers:
            x = layer(x, ctx)
        if cache is not None:
            cache.commit(ctx.step, T)
        h = self.norm(x)
        return h[:, entry.n_virtual:] if entry.n_virtual else h

    def attention_on(self, tokens: torch.Tensor, inputs: list[torch.Tensor], *,
                     backend: str | None = None) -> list[torch.Tensor]:
        """Each layer's attention output for the given per-layer attention inputs ``(B, T, d_model)``
        (e.g. another model's post-norm hidden states at the same tokens): layer-wise attention
        transfer fits these to a teacher's without running the MLPs or the LM head. CLA consumers
        read what their producer computed from its own given input."""
        if len(inputs) != self.cfg.n_layer:
            raise ConfigError(f"attention_on needs one input per layer ({self.cfg.n_layer}), got {len(inputs)}")
        ctx = self.plain_context(tokens, inputs[0].dtype, backend)
        return [block.self_attn(h, ctx) for block, h in zip(self.layers, inputs)]

    def plain_context(self, tokens: torch.Tensor, dtype: torch.dtype, backend: str | None = None) -> ForwardContext:
        """The forward context of a plain call on ``tokens`` (no cache, mask or prompt adapter), RoPE
        tables included, for callers that run layers one at a time."""
        ctx = self._context(tokens, tokens.shape[1], None, None, None, 0, backend or self.cfg.attn_backend)
        if self.cfg.pos == "rope":
            ctx.rope_inv_freq = self.rope_inv_freq(tokens.device)
            ctx.cos, ctx.sin = rope_cos_sin(ctx.q_pos, ctx.rope_inv_freq, dtype)
        return ctx

    def _context(self, tokens: torch.Tensor, T: int, attention_mask: torch.Tensor | None, cache: KVCache | None,
                 segment_ids: torch.Tensor | None, prefix_len: int, backend: str) -> ForwardContext:
        """Positions and validity of this call's queries and keys (and the cache step), for every
        layer, and the positional prior they all add (ALiBi), which reads the mask's positions."""
        ctx = self._positions(tokens, T, attention_mask, cache, segment_ids, prefix_len, backend)
        if self.alibi is not None:
            ctx.score_bias, ctx.all_visible = self.alibi, False
        elif self.cfg.pos == "t5":
            ctx.score_bias, ctx.all_visible = self.embed_relative, False
        return ctx

    def _positions(self, tokens: torch.Tensor, T: int, attention_mask: torch.Tensor | None, cache: KVCache | None,
                   segment_ids: torch.Tensor | None, prefix_len: int, backend: str) -> ForwardContext:
        cfg, dev, B = self.cfg, tokens.device, tokens.shape[0]
        if segment_ids is not None:
            pos = positions_in_segments(segment_ids)
            valid = segment_ids > 0
            return ForwardContext(backend, pos, pos, q_valid=valid, k_valid=valid, q_seg=segment_ids,
                                  k_seg=segment_ids)
        if cache is None:
            if cfg.pos == "learned" and T + prefix_len > cfg.max_seq_len:
                raise ConfigError(f"sequence length {T + prefix_len} exceeds max_seq_len={cfg.max_seq_len} of a "
                                  f"model with learned positions")
            valid = attention_mask.bool() if attention_mask is not None else None
            pos = (positions_from_attention_mask(valid) if valid is not None
                   else torch.arange(T, device=dev).unsqueeze(0)) + prefix_len
            k_pos, k_valid = pos, valid
            if prefix_len:
                k_pos = torch.cat([torch.arange(prefix_len, device=dev).expand(pos.shape[0], -1), pos], 1)
                if valid is not None:
                    k_valid = torch.cat([valid.new_ones(B, prefix_len), valid], 1)
            return ForwardContext(backend, pos, k_pos, q_valid=valid, k_valid=k_valid,
                                  plain=valid is None and not prefix_len)
        step = cache.prepare(T, attention_mask)
        return ForwardContext(backend, step.q_pos, torch.arange(step.k_len, device=dev).unsqueeze(0),
                              q_valid=step.q_valid, k_valid=step.k_valid, k_lengths=step.new_lengths,
                              plain=step.uniform_start == 0,
                              all_visible=step.uniform_start is not None and T == 1,
                              cache=cache, step=step)

    # ------------------------------------------------------------------------ conveniences
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Transformer":
        return cls(ModelConfig.from_preset(name, **overrides))


def _parameters_of(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules``, each once (a module may be listed twice, a tensor shared)."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())

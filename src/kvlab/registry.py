"""The two registries of kvlab: attention kinds and attention backends.

They sit in the lowest layer of the package (next to ``errors`` and ``dtypes``) so that the
configuration can validate kind and backend names and compute cache accounting, while the
implementations, which live in higher layers (``kvlab.attention``, ``kvlab.cache``), register
themselves when they are imported. Importing ``kvlab`` imports every built-in kind and backend.

An **attention kind** is registered once, with everything the rest of kvlab needs to know about
it: the module a layer of that kind is built from, the cache layer it keeps during generation,
the closed-form cache bytes of one layer, the closed-form parameter count of one layer, the
options a layer spec may give and their defaults, its label in plans and reports, and its
capabilities (prefix adapters, softmax scores, encoder–decoders, quantized caches, KV-head
variants), which every feature that depends on them reads instead of naming kinds. See
``docs/ARCHITECTURE.md``, "How to add an attention kind".

An **attention backend** computes ``softmax(q·kᵀ·scale + bias, masked)·v`` for grouped queries;
each says for a given call whether it can serve it (``supports``), so that ``auto`` picks one that
can and an explicit request that cannot be served fails with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvlab.errors import ConfigError

if TYPE_CHECKING:   # annotations only: the registry imports nothing above it
    import torch


@dataclass(frozen=True)
class CacheBytes:
    """What a cache costs: bytes that grow with every token, bytes fixed per sequence (a recurrent
    state, quantization scales), and ``bounded`` terms ``(bytes per token, at most this many
    tokens)`` — a rolling window grows with the sequence until it holds its window, then stays — and
    ``pooled`` terms ``(bytes per slot, tokens per slot)``: memory compression, one summary slot per
    block of tokens (a slot is allocated as soon as its block begins). An encoder–decoder's
    cross-attention K/V cost ``per_source_token``: bytes per token of the source sequence, computed
    once per source and kept for the whole generation."""

    per_token: int = 0
    per_sequence: int = 0
    bounded: tuple[tuple[int, int], ...] = ()
    pooled: tuple[tuple[int, int], ...] = ()
    per_source_token: int = 0

    def __add__(self, other: "CacheBytes") -> "CacheBytes":
        return CacheBytes(self.per_token + other.per_token, self.per_sequence + other.per_sequence,
                          self.bounded + other.bounded, self.pooled + other.pooled,
                          self.per_source_token + other.per_source_token)

    def for_sequence(self, n_tokens: int, source_tokens: int = 0) -> int:
        """Bytes one sequence of ``n_tokens`` tokens (of a source of ``source_tokens``) holds."""
        return (self.per_token * n_tokens + self.per_source_token * source_tokens + self.per_sequence
                + sum(rate * min(n_tokens, cap) for rate, cap in self.bounded)
                + sum(rate * -(-n_tokens // block) for rate, block in self.pooled))

    @property
    def at_most(self) -> int:
        """Bytes a sequence holds however long it gets, beside ``per_token`` growth: its fixed and
        its windowed parts at their fullest."""
        return self.per_sequence + sum(rate * cap for rate, cap in self.bounded)


@dataclass(frozen=True)
class Capabilities:
    """What the rest of kvlab may do with layers of a kind. Every flag is off unless the kind says
    otherwise, so a new kind is refused where it has not been thought through, with a one-line
    error naming the kind, instead of being run as if it were softmax attention over full K/V."""

    # Its layers read K/V prefixes written into their cache (prefix tuning, P-tuning v2: per-head
    # keys and values of n_kv_head heads for every producer layer).
    prefix_adapters: bool = False
    # Its scores are softmax(q·kᵀ·scale) with the config's ``attn_scale`` as the scale (T5 folds the
    # 1/sqrt(d) into its weights and sets attn_scale=1).
    softmax_scores: bool = False
    # It can be the decoder self-attention of an encoder–decoder.
    encoder_decoder: bool = False
    # Its per-token cache entries (the cache layer's ``token_fields``) may be stored as fp8/int8/int4
    # codes (``kv_quant``, :mod:`kvlab.cache.quantized`), and its ``cache_bytes`` counts them so.
    # A kind without per-token entries (a recurrent state) has nothing to quantize and is not refused.
    quantizable_cache: bool = False
    # Its quantizable cache stores keys and values as separate per-token fields (keys first), so they
    # may be kept in different formats (``int8/int4``: :class:`kvlab.dtypes.MixedKVQuant`). A latent
    # that is keys and values at once (MLA, low-rank) has one format.
    separate_kv_cache: bool = False
    # Its cache holds ``n_kv_head`` heads per token, so fewer KV heads (GQA, MQA) make it smaller:
    # the planner lists those variants. Latent caches (MLA, low-rank) do not depend on the head count.
    kv_heads: bool = False


@dataclass(frozen=True)
class AttentionKind:
    """One attention kind: how to build, cache, count, name and validate a layer of it.

    ``module(cfg, layer) -> nn.Module`` builds the layer's attention; its ``forward(x, ctx)``
    reads and writes what it needs through the :class:`~kvlab.attention.context.ForwardContext`.
    ``cache_layer(cfg, layer, batch_size, max_len, dtype, device)`` returns the layer's cache
    layer, or ``None`` when the layer caches nothing itself (a CLA consumer).
    ``cache_bytes(cfg, layer, dtype) -> CacheBytes`` and ``param_count(cfg, layer) -> int`` are
    closed forms over the config (the tests check them against real allocations and modules); a kind
    with ``capabilities.quantizable_cache`` also takes ``kv_quant=`` (``'fp8'``, ``'int8'``, ``'int4'`` or
    ``'int8/int4'`` storage of the per-token entries, scales included).
    ``options`` are the names a layer spec (or the config's ``attn_options``) may give, and
    ``option_defaults(cfg, options) -> dict`` the values of those left out (e.g. MLA's head widths
    from head_dim); :attr:`kvlab.config.model.ModelConfig.layer_specs` resolves them.
    ``validate(cfg, layer, options)`` raises :class:`ConfigError` for impossible options.
    ``label(cfg, layers) -> str`` names the attention of ``layers`` (all of this kind) in plans and
    reports ("GQA-4", "MLA 512+64"); ``describe(cfg, layers) -> str`` says what a token caches there,
    for ``kvlab info``. ``examples`` are named test configurations (see the field's comment).
    """

    name: str
    module: Callable[..., Any]
    cache_layer: Callable[..., Any]
    cache_bytes: Callable[..., CacheBytes]
    param_count: Callable[..., int]
    options: tuple[str, ...] = ()
    validate: Callable[..., None] | None = None
    option_defaults: Callable[..., dict[str, Any]] | None = None
    description: str = ""
    label: Callable[..., str] | None = None
    describe: Callable[..., str] | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)
    # reach(cfg, layer) -> how many positions back a query of the layer can see a key at (what its
    # position encoding must have been trained on), or None when that grows with the sequence.
    # None (the default) for a kind that does not say.
    reach: Callable[..., int | None] | None = None
    # Small configurations that exercise every code path of the kind: overrides of the "tiny"
    # preset by name. The test suite's generic tests (decode == forward, backends vs float64, cache
    # bytes vs allocation, checkpoint round trip) run on every registered kind's examples.
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)

    def layer_label(self, cfg: Any, layers: list[int]) -> str:
        """:attr:`label`, or the kind's name for a kind that gives none."""
        return self.label(cfg, layers) if self.label is not None else self.name

    def layer_description(self, cfg: Any, layers: list[int]) -> str:
        """:attr:`describe`, or the shape every kind has: query heads, KV heads, head width."""
        if self.describe is not None:
            return self.describe(cfg, layers)
        return f"{cfg.n_head} query, {cfg.n_kv_head} KV (group {cfg.q_per_kv}), head_dim {cfg.head_dim}"


def kinds_without(capability: str, kind_names) -> list[str]:
    """The names among ``kind_names`` whose kinds lack ``capability`` (sorted): what a feature that
    needs it must refuse."""
    return sorted({name for name in kind_names if not getattr(get_kind(name).capabilities, capability)})


KINDS: dict[str, AttentionKind] = {}


def register_kind(kind: AttentionKind) -> AttentionKind:
    if kind.name in KINDS and KINDS[kind.name] is not kind:
        raise ConfigError(f"attention kind {kind.name!r} is registered already; choose another name")
    KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind (tests that register a throwaway kind clean up with this)."""
    KINDS.pop(name, None)


def get_kind(name: str) -> AttentionKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown attention kind {name!r}; registered kinds are {sorted(KINDS)}") from None


@dataclass(frozen=True)
class Backend:
    """An attention backend.

    ``fn(q, k, v, mask, scale, bias) -> out``; ``supports(q, k, v, mask, bias)`` returns ``None``
    when the backend can compute this call and otherwise one sentence saying why not;
    ``auto_rank(q)`` is the backend's rank for ``auto`` on q's device and dtype (higher first,
    ``None`` = never chosen automatically).
    """

    name: str
    fn: Callable[..., "torch.Tensor"]
    supports: Callable[..., str | None] = field(default=lambda *a: None)
    auto_rank: Callable[..., int | None] = field(default=lambda q: None)


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    """Every name ``attn_backend`` / ``backend=`` accepts."""
    return sorted(BACKENDS) + ["auto"]

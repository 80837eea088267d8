"""The model-wide cache: per-row lengths and step planning, over one cache layer per caching layer.

Each layer's attention kind brings its cache layer (:attr:`kvlab.registry.AttentionKind.cache_layer`):
full K/V buffers ``(B, n_kv_head, max_len, head_dim)`` for the ``gqa`` kind's producer layers,
nothing for CLA consumers, which attend to their producer's. A token's slot is its position (see
:mod:`kvlab.cache.full`), so the step plan below is shared by every layer.
"""

from __future__ import annotations

import torch

from kvlab.cache.base import CacheLayer, CacheStep
from kvlab.cache.full import FullKVLayer
from kvlab.cache.quantized import QuantizedTokenLayer, share_workspace
from kvlab.cache.rolling import RollingKVLayer
from kvlab.config.accounting import layer_kv_quant
from kvlab.config.model import ModelConfig
from kvlab.dtypes import KVQuant, parse_dtype
from kvlab.errors import CacheOverflowError, ConfigError
from kvlab.layers.positions import positions_from_attention_mask
from kvlab.registry import get_kind

__all__ = ["CacheStep", "KVCache", "make_cache_layer"]


def make_cache_layer(cfg: ModelConfig, layer: int, batch_size: int, max_len: int, dtype: torch.dtype,
                     device: str | torch.device, kv_quant: KVQuant | None = None) -> CacheLayer | None:
    """Layer ``layer``'s cache layer, as its kind builds it; with ``kv_quant`` a layer of per-token
    entries (``token_fields``) is kept quantized instead (:mod:`kvlab.cache.quantized`)."""
    kind = get_kind(cfg.layer_specs[layer].kind)
    kv_quant = layer_kv_quant(cfg, layer, kv_quant)
    if kv_quant:
        shell = kind.cache_layer(cfg, layer, batch_size, max_len, dtype, "meta")    # shapes only
        if shell is None:
            return None
        if getattr(shell, "token_fields", None):
            return QuantizedTokenLayer(shell, kv_quant, device=device)
    return kind.cache_layer(cfg, layer, batch_size, max_len, dtype, device)


def integer_key_layers(cfg: ModelConfig, kv_quant) -> frozenset[int]:
    """The producers whose cache keeps keys as integer codes (int8/int4, rotated or not) under
    ``kv_quant``: the caches that keys balanced against the queries are for (kvlab.convert.balance); a
    float cache, fp8 included, rounds each value relative to itself, which balance does not help.
    Resolved once per cache, not per layer and step."""
    out = set()
    for i in cfg.kv_producers:
        fmt = layer_kv_quant(cfg, i, kv_quant)
        if fmt is not None and not fmt.formats[0].is_float:
            out.add(i)
    return frozenset(out)


class KVCache:
    """The cache of a model ``cfg``: one cache layer per layer whose kind caches something.

    ``lengths`` (B,) counts the tokens each row holds. The cache also keeps, in Python, an
    upper bound on the longest row and whether all rows have the same length, so that decode
    steps never need to read ``lengths`` back from the device.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 kv_quant: KVQuant | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        if not isinstance(max_len, int) or max_len < 1:
            raise ConfigError(f"max_len={max_len!r} must be a positive integer")
        if cfg.pos == "learned" and max_len > cfg.max_seq_len:
            raise ConfigError(f"max_len={max_len} exceeds max_seq_len={cfg.max_seq_len} of a model with "
                              f"learned positions; use max_len <= {cfg.max_seq_len}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.max_len = max_len
        self.dtype = parse_dtype(dtype)
        self.kv_quant = kv_quant
        self.integer_keys = integer_key_layers(cfg, kv_quant)
        self.layers: dict[int, CacheLayer] = {}
        for i in range(cfg.n_layer):
            layer = make_cache_layer(cfg, i, batch_size, max_len, self.dtype, device, self.kv_quant)
            if layer is not None:
                self.layers[i] = layer
        share_workspace(cfg, self.layers)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._bound = 0          # >= lengths.max()
        self._uniform = True     # all rows hold exactly _bound tokens

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def keys(self) -> dict[int, torch.Tensor]:
        """The K buffers of the K/V layers (full or rolling), by layer (read-only view of the layers)."""
        return {i: layer.keys for i, layer in self.layers.items() if isinstance(layer, (FullKVLayer, RollingKVLayer))}

    @property
    def values(self) -> dict[int, torch.Tensor]:
        return {i: layer.values for i, layer in self.layers.items()
                if isinstance(layer, (FullKVLayer, RollingKVLayer))}

    @property
    def nbytes(self) -> int:
        """Bytes held by the layers' buffers: ``cache_bytes(cfg, dtype, kv_quant).for_sequence(max_len)``
        × ``batch_size``."""
        return sum(layer.nbytes for layer in self.layers.values())

    def assume_filled(self, n_tokens: int) -> None:
        """Declare that every row holds ``n_tokens`` tokens already in the buffers.

        For benchmarks and tests that write the buffers directly instead of prefilling.
        """
        if not 0 <= n_tokens <= self.max_len:
            raise ConfigError(f"n_tokens={n_tokens} must be in [0, max_len={self.max_len}]")
        # New tensors rather than in-place updates: after a step under torch.inference_mode the
        # lengths are an inference tensor, which may not be modified in place outside it.
        self.lengths = torch.full_like(self.lengths, n_tokens)
        for layer in self.layers.values():
            if hasattr(layer, "assume_filled"):      # layers whose slots are not positions (rolling)
                layer.assume_filled(n_tokens)
        self._bound, self._uniform = n_tokens, True

    def reset(self) -> None:
        self.assume_filled(0)

    @property
    def is_empty(self) -> bool:
        return self._bound == 0

    def write_prefix(self, per_layer: dict[int, tuple[torch.Tensor, ...]]) -> None:
        """Fill slots ``[0, P)`` of every row with trained prefixes (``(1|B, n_kv_head, P, D)`` K and V
        per producer, for full layers; prefix tuning); the prompt then starts at position ``P``."""
        if not self.is_empty:
            raise ConfigError("a prefix goes into an empty cache; call cache.reset() first")
        n = next(iter(per_layer.values()))[0].shape[2]
        if n > self.max_len:
            raise CacheOverflowError(f"the prefix has {n} tokens but the cache holds max_len={self.max_len}")
        for layer, entries in per_layer.items():
            self.layers[layer].write_prefix(*entries)
        self.assume_filled(n)

    # ----------------------------------------------------------------------------- stepping
    def prepare(self, n_tokens: int, attention_mask: torch.Tensor | None = None) -> CacheStep:
        """Plan appending ``n_tokens`` per row (``attention_mask`` marks real ones); no writes yet."""
        B = self.batch_size
        dev = self.device
        if attention_mask is not None and attention_mask.shape != (B, n_tokens):
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                              f"({B}, {n_tokens}) for this cache and input")
        k_len = self._bound + n_tokens
        if k_len > self.max_len:
            raise CacheOverflowError(
                f"appending {n_tokens} token(s) to a KV cache holding up to {self._bound} of max_len="
                f"{self.max_len} would overflow it; allocate the cache with a larger max_len "
                f"(model.new_cache(batch_size, max_len=...))")
        steps = torch.arange(n_tokens, device=dev)
        if attention_mask is None and self._uniform:
            start = self._bound
            return CacheStep(q_pos=(start + steps).unsqueeze(0), q_valid=None, k_len=k_len, k_valid=None,
                             new_lengths=self.lengths + n_tokens, uniform_start=start, write_index=None)
        if attention_mask is None:
            q_pos = self.lengths.unsqueeze(1) + steps
            q_valid = None
            new_lengths = self.lengths + n_tokens
            rows = torch.arange(B, device=dev).unsqueeze(1)
            write_index = (rows, steps.unsqueeze(0), q_pos)           # broadcast (B, T)
        else:
            q_valid = attention_mask.bool()
            q_pos = positions_from_attention_mask(q_valid, start=self.lengths)
            new_lengths = self.lengths + q_valid.sum(dim=1)
            rows, toks = q_valid.nonzero(as_tuple=True)
            write_index = (rows, toks, q_pos[rows, toks])
        k_valid = torch.arange(k_len, device=dev).unsqueeze(0) < new_lengths.unsqueeze(1)
        return CacheStep(q_pos=q_pos, q_valid=q_valid, k_len=k_len, k_valid=k_valid,
                         new_lengths=new_lengths, uniform_start=None, write_index=write_index)

    def keys_in_codes(self, layer: int) -> bool:
        """Whether producer ``layer`` stores its keys as integer codes (:func:`integer_key_layers`)."""
        return layer in self.integer_keys

    def update(self, layer: int, *new: torch.Tensor, step: CacheStep, stored: bool = False) -> tuple:
        """Store layer ``layer``'s new entries (K and V for a full layer); return what it attends to.
        ``stored=True``: a quantized layer returns its entries as stored
        (:class:`~kvlab.cache.quantized.QuantizedEntries`), for a kernel that reads codes."""
        target = self.layers[layer]
        if stored and isinstance(target, QuantizedTokenLayer):
            return target.store(*new, step=step)
        return target.update(*new, step=step)

    def commit(self, step: CacheStep, n_tokens: int) -> None:
        """Make the step's tokens part of the cache (after every layer has written)."""
        self.lengths = step.new_lengths
        self._bound += n_tokens
        if step.q_valid is not None:
            self._uniform = False

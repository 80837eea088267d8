"""An encoder–decoder's caches: the decoder's self-attention cache plus the cross-attention K/V of
the source, computed once per source sequence and read by every decoding step.

The source K/V are a function of the encoder's output only, so they never grow during generation:
``CrossKV`` holds, per cross-attention producer layer, ``(B, cross_n_kv_head, S, head_dim)`` keys
and values and the source's validity ``(B, S)`` (ragged sources in one batch). Their bytes are
:func:`kvlab.config.accounting.cross_cache_bytes` per source token, apart from the self-attention
cache's per-target-token bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.cache.cache import KVCache
from kvlab.cache.full import FullKVLayer
from kvlab.errors import ConfigError


@dataclass
class CrossKV:
    """The source side of cross-attention: K/V per producer layer and which source tokens are real."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor | None          # (B, S) False for source padding; None when no row is padded

    @property
    def n_tokens(self) -> int:
        return next(iter(self.kv.values()))[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv.values() for t in pair)

    def select_rows(self, index: torch.Tensor) -> "CrossKV":
        """The rows ``index`` (e.g. each source repeated once per beam)."""
        return CrossKV({i: (k[index], v[index]) for i, (k, v) in self.kv.items()},
                       None if self.valid is None else self.valid[index])


class Seq2SeqCache(KVCache):
    """The decoder's self-attention :class:`KVCache` and the source's :class:`CrossKV` (None until the
    first call encodes a source into it)."""

    cross: CrossKV | None = None

    @property
    def nbytes(self) -> int:
        """Self-attention buffers plus the cross-attention K/V."""
        return super().nbytes + (self.cross.nbytes if self.cross is not None else 0)

    def reset(self) -> None:
        super().reset()
        self.cross = None

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (in that order, repeats allowed) of every buffer: beam search
        reorders its hypotheses with it after each step."""
        for i, layer in self.layers.items():
            if type(layer) is not FullKVLayer:
                raise ConfigError(f"reordering cache rows needs full K/V layers; layer {i} keeps a "
                                  f"{type(layer).__name__} (a window or quantized cache): beam search is not "
                                  f"supported with it")
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.lengths = self.lengths[index]
        if self.cross is not None:
            self.cross = self.cross.select_rows(index)

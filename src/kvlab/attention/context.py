"""What every layer of one forward call shares: positions, masks, RoPE tables, the cache step.

The model fills a :class:`ForwardContext` once per call; each attention module asks it for what
its kind needs — :meth:`ForwardContext.mask` for its window (built once per distinct window and
shared by the layers that use it), the RoPE tables, its cache layer, the K/V an earlier layer
produced (CLA), or keys that come before the call's own (prefix tuning without a cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlab.attention.masks import AttentionMask, BlockSparse


@dataclass
class ForwardContext:
    """State shared by all layers during one forward call of the model.

    ``q_pos``/``k_pos`` and the validity and segment tensors describe queries and keys as in
    :class:`AttentionMask`. ``plain`` says queries and keys are one unpadded sequence from position
    0 (a backend's built-in causal path applies when there is no window); ``all_visible`` says every
    key is visible to every query unless a window hides some (one decode token over uniform rows).
    """

    backend: str
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_valid: torch.Tensor | None = None
    k_valid: torch.Tensor | None = None
    q_seg: torch.Tensor | None = None
    k_seg: torch.Tensor | None = None
    k_lengths: torch.Tensor | None = None
    plain: bool = False
    all_visible: bool = False
    causal: bool = True                        # False: an encoder's bidirectional self-attention
    cos: torch.Tensor | None = None            # RoPE tables for the new tokens, (B|1, 1, T, D)
    sin: torch.Tensor | None = None
    rope_inv_freq: torch.Tensor | None = None  # the RoPE frequencies (to rotate at other positions)
    cache: "object | None" = None              # kvlab.cache.KVCache
    step: "object | None" = None               # kvlab.cache.CacheStep
    kv: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)   # producer layer -> what it made
    prefix: dict[int, tuple[torch.Tensor, ...]] | None = None   # producer -> prefix K, V (no cache)
    memo: dict = field(default_factory=dict, repr=False)       # per-call tables a kind derives once (e.g. MLA's RoPE)
    score_bias: "object | None" = None         # a positional prior every layer adds (ALiBi), or None
    # producer layer -> (key positions, key validity) of the keys its cache layer returned, when
    # they are not the model-wide slots (a rolling window cache returns its window, then the new keys)
    key_positions: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    cross: "object | None" = None              # an encoder–decoder's source K/V (kvlab.attention.cross.CrossKV)
    _masks: dict[tuple, AttentionMask | None] = field(default_factory=dict, repr=False)

    def mask(self, window: int | None = None, sinks: int = 0, source: int | None = None,
             sparse: BlockSparse | None = None) -> AttentionMask | None:
        """The mask for a layer with this sliding window, sinks and block-sparse layout (None: attend
        to every key), over the keys of producer ``source`` when its cache returned keys of their
        own positions."""
        own = self.key_positions.get(source) if source is not None else None
        key = (window, sinks if window is not None else 0, source if own is not None else None, sparse)
        if key not in self._masks:
            if own is not None:
                self._masks[key] = AttentionMask(self.q_pos, own[0], q_valid=self.q_valid, k_valid=own[1],
                                                 window=window, sinks=key[1], sparse=sparse)
            elif self.all_visible and window is None and sparse is None:
                self._masks[key] = None
            else:
                self._masks[key] = AttentionMask(
                    self.q_pos, self.k_pos, q_valid=self.q_valid, k_valid=self.k_valid, causal=self.causal,
                    window=window, sinks=key[1],
                    plain_causal=self.causal and self.plain and window is None and sparse is None, q_seg=self.q_seg,
                    k_seg=self.k_seg, k_lengths=self.k_lengths, sparse=sparse)
        return self._masks[key]

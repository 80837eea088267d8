"""Boolean "may attend" masks, built in one place.

Every query and key carries a *position* (its index in its own sequence, not counting padding)
and a *valid* flag (False for padding). Query ``q`` may attend to key ``k`` of the same row when
both are valid, ``pos_k <= pos_q`` (causal) and ``pos_q - pos_k < window`` (sliding window) or
``pos_k < sinks`` (StreamingLLM's attention sinks: the first positions stay visible to a window),
and, under a block-sparse layout (:class:`BlockSparse`), the key's block is one the query's block
reads (local blocks, global blocks, strided blocks — Longformer/BigBird/Sparse Transformer).
Packed rows (several documents in one row, SFT packing) add a *segment* id per token: a query
attends only to keys of its own segment. That one rule covers a padded batch without a cache (positions
count real tokens, so left and
right padding behave the same), a prefill or decode step against a KV cache (key positions are
cache slots), and their combination.

:class:`AttentionMask` keeps the rule in that structured form so a tiled kernel can evaluate it
per tile; :meth:`AttentionMask.dense` materializes the ``(B, 1, Tq, Tk)`` boolean tensor for
backends that take one. A query with nothing to attend to (a padding query) has an all-False
row; every backend turns that row into zeros, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvlab.errors import ConfigError
from kvlab.layers.positions import positions_from_attention_mask, positions_in_segments

__all__ = ["AttentionMask", "BlockSparse", "may_attend", "positions_from_attention_mask", "positions_in_segments"]


@dataclass(frozen=True)
class BlockSparse:
    """A block-sparse causal layout over positions: positions are cut into blocks of ``block``;
    the query block ``qb`` reads key block ``kb <= qb`` when it is one of the ``local`` latest blocks
    (``qb - kb < local``: its own and the ones before — Longformer's band), one of the first
    ``global_blocks`` blocks (global tokens every query sees: BigBird's / Longformer's global
    attention, causally), or ``stride`` blocks apart (``(qb - kb) % stride == 0``: the Sparse
    Transformer's strided pattern; 0 = none). Inside the visible blocks the usual causal rule holds.

    A rule of positions like the window's, so caches, padding and decoding need nothing new; the
    kernels use :meth:`any_allowed` on whole tiles to skip the ones it hides.
    """

    block: int
    local: int = 1
    global_blocks: int = 0
    stride: int = 0

    FIELDS = {"block": "block", "local": "local", "global": "global_blocks", "stride": "stride"}

    @classmethod
    def parse(cls, spec: Any, where: str) -> "BlockSparse | None":
        """From a config's ``{"block": 64, "local": 4, "global": 1, "stride": 0}`` (None: dense)."""
        if spec is None or isinstance(spec, BlockSparse):
            return spec
        if not isinstance(spec, dict) or "block" not in spec:
            raise ConfigError(f"{where}={spec!r} must be a dict with 'block' and optionally 'local', 'global', "
                              f"'stride', e.g. {{\"block\": 64, \"local\": 4, \"global\": 1}}")
        unknown = sorted(set(spec) - set(cls.FIELDS))
        if unknown:
            raise ConfigError(f"{where} has no field(s) {unknown}; its fields are {list(cls.FIELDS)}")
        values = {cls.FIELDS[k]: v for k, v in spec.items()}
        for name, v in spec.items():
            least = 1 if name in ("block", "local") else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ConfigError(f"{where}: {name}={v!r} must be an integer >= {least}")
        return cls(**values)

    def to_dict(self) -> dict[str, int]:
        return {"block": self.block, "local": self.local, "global": self.global_blocks, "stride": self.stride}

    def blocks_allowed(self, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        """Whether query block ``qb`` reads key block ``kb`` (broadcasting integer tensors)."""
        d = qb - kb
        ok = (d < self.local) | (kb < self.global_blocks)
        if self.stride:
            ok = ok | (d % self.stride == 0)
        return ok & (d >= 0)

    def allows(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return self.blocks_allowed(q_pos.div(self.block, rounding_mode="floor"),
                                   k_pos.div(self.block, rounding_mode="floor"))

    def any_allowed(self, q_lo: torch.Tensor, q_hi: torch.Tensor, k_lo: torch.Tensor,
                    k_hi: torch.Tensor) -> torch.Tensor:
        """Whether some query position in ``[q_lo, q_hi]`` may read some key position in
        ``[k_lo, k_hi]`` under the layout (broadcasting; exact for these rectangles: each pattern is
        decided from the range of block distances ``[d_lo, d_hi]`` the rectangle spans)."""
        b = self.block
        qb_lo, qb_hi = q_lo.div(b, rounding_mode="floor"), q_hi.div(b, rounding_mode="floor")
        kb_lo, kb_hi = k_lo.div(b, rounding_mode="floor"), k_hi.div(b, rounding_mode="floor")
        d_lo, d_hi = (qb_lo - kb_hi).clamp_min(0), qb_hi - kb_lo         # causal: distances >= 0 only
        spans = d_hi >= d_lo
        ok = d_lo < self.local
        ok = ok | ((kb_lo < self.global_blocks) & (kb_lo <= qb_hi))
        if self.stride:
            ok = ok | (d_hi.div(self.stride, rounding_mode="floor") * self.stride >= d_lo)
        return spans & ok

    def visible_fraction(self, length: int) -> float:
        """The fraction of causal (query, key) pairs of a ``length``-token sequence it keeps."""
        pos = torch.arange(length)
        allowed = self.allows(pos[:, None], pos[None, :]) & (pos[None, :] <= pos[:, None])
        return float(allowed.sum()) / (length * (length + 1) / 2)

    def describe(self) -> str:
        parts = [f"block {self.block}", f"local {self.local}"]
        if self.global_blocks:
            parts.append(f"global {self.global_blocks}")
        if self.stride:
            parts.append(f"stride {self.stride}")
        return "sparse " + ", ".join(parts)


def may_attend(q_pos: torch.Tensor, k_pos: torch.Tensor, *, q_valid: torch.Tensor | None = None,
               k_valid: torch.Tensor | None = None, causal: bool = True,
               window: int | None = None, q_seg: torch.Tensor | None = None,
               k_seg: torch.Tensor | None = None, sinks: int = 0,
               sparse: BlockSparse | None = None, k_exempt: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean mask ``(B, 1, Tq, Tk)`` from positions ``(B|1, Tq)``, ``(B|1, Tk)``, validity,
    (packed rows) segment ids and a block-sparse layout."""
    qp = q_pos.unsqueeze(-1)            # (B|1, Tq, 1)
    kp = k_pos.unsqueeze(-2)            # (B|1, 1, Tk)
    allowed = torch.ones(torch.broadcast_shapes(qp.shape, kp.shape), dtype=torch.bool, device=q_pos.device)
    # Out of place: a validity mask may have a larger batch than the positions.
    if causal:
        allowed = allowed & (kp <= qp)
    if window is not None:
        in_window = (qp - kp) < window
        if sinks:
            in_window = in_window | (kp < sinks)
        if k_exempt is not None:          # keys the window does not apply to (summary slots)
            in_window = in_window | k_exempt.bool().unsqueeze(-2)
        allowed = allowed & in_window
    if sparse is not None:
        allowed = allowed & sparse.allows(qp, kp)
    if q_valid is not None:
        allowed = allowed & q_valid.bool().unsqueeze(-1)
    if k_valid is not None:
        allowed = allowed & k_valid.bool().unsqueeze(-2)
    if q_seg is not None:
        allowed = allowed & (q_seg.unsqueeze(-1) == k_seg.unsqueeze(-2))
    return allowed.unsqueeze(1)


@dataclass
class AttentionMask:
    """Which keys each query may attend to, in the structured form described above.

    ``plain_causal`` marks the common case where queries and keys are the same unpadded
    sequence starting at 0 with no window: backends may then use their built-in causal path.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_valid: torch.Tensor | None = None
    k_valid: torch.Tensor | None = None
    causal: bool = True
    window: int | None = None
    sinks: int = 0                         # with a window: the first positions stay visible
    plain_causal: bool = False
    q_seg: torch.Tensor | None = None      # packed rows: segment id per query / key
    k_seg: torch.Tensor | None = None
    k_lengths: torch.Tensor | None = None  # (B,) keys per row when a cache knows them (decode kernels)
    sparse: BlockSparse | None = None      # a block-sparse layout on top of the rest
    k_exempt: torch.Tensor | None = None   # (B|1, Tk) keys the window does not hide (compressed memory)
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _tiles: dict = field(default_factory=dict, repr=False)

    def dense(self) -> torch.Tensor:
        """``(B, 1, Tq, Tk)`` booleans; computed once and shared by every layer of a forward."""
        if self._dense is None:
            self._dense = may_attend(self.q_pos, self.k_pos, q_valid=self.q_valid,
                                     k_valid=self.k_valid, causal=self.causal, window=self.window,
                                     q_seg=self.q_seg, k_seg=self.k_seg, sinks=self.sinks, sparse=self.sparse,
                                     k_exempt=self.k_exempt)
        return self._dense

    def row_has_keys(self) -> torch.Tensor:
        """``(B, 1, Tq, 1)``: False for queries that may attend to nothing (their output is 0)."""
        return self.dense().any(dim=-1, keepdim=True)

    def tile_map(self, block_q: int, block_k: int) -> torch.Tensor:
        """``(ceil(Tq/block_q), ceil(Tk/block_k))`` booleans: False where the rule hides every
        (query, key) pair of the tile, so a tiled kernel may skip it without looking inside.

        Decided from each tile's range of valid positions (over all rows), never from the
        ``Tq × Tk`` mask: the work is one entry per tile. Causal order, the window with its sinks
        and a block-sparse layout are each exact on such ranges; their conjunction, ragged rows and
        segments may leave a tile marked visible that holds nothing visible, which the kernel's
        per-element mask then handles (conservative, never wrong)."""
        key = (block_q, block_k)
        if key not in self._tiles:
            q_lo, q_hi, q_any = _tile_ranges(self.q_pos, self.q_valid, block_q)
            k_lo, k_hi, k_any = _tile_ranges(self.k_pos, self.k_valid, block_k)
            q_lo, q_hi, q_any = q_lo[:, None], q_hi[:, None], q_any[:, None]
            visible = q_any & k_any
            if self.causal:
                visible = visible & (k_lo <= q_hi)
            if self.window is not None:
                near = (q_lo - k_hi) < self.window
                if self.sinks:
                    near = near | (k_lo < self.sinks)
                if self.k_exempt is not None:
                    near = near | _tile_any(self.k_exempt, block_k)
                visible = visible & near
            if self.sparse is not None:
                visible = visible & self.sparse.any_allowed(q_lo, q_hi, k_lo, k_hi)
            self._tiles[key] = visible
        return self._tiles[key]


def _tile_any(flags: torch.Tensor, block: int) -> torch.Tensor:
    """Per tile of ``block`` consecutive indices: whether any row flags any of them."""
    T = flags.shape[-1]
    flags = torch.nn.functional.pad(flags.bool(), (0, -(-T // block) * block - T))
    return flags.view(flags.shape[0], -1, block).any(dim=2).any(dim=0)


def _tile_ranges(pos: torch.Tensor, valid: torch.Tensor | None, block: int):
    """Per tile of ``block`` consecutive indices: the lowest and highest valid position over all
    rows, and whether the tile holds any valid entry at all."""
    B, T = pos.shape[0] if valid is None else max(pos.shape[0], valid.shape[0]), pos.shape[-1]
    n_tiles = -(-T // block)
    pos = pos.expand(B, T).long()
    ok = torch.ones(B, T, dtype=torch.bool, device=pos.device) if valid is None else valid.bool().expand(B, T)
    pad = n_tiles * block - T
    if pad:
        pos = torch.nn.functional.pad(pos, (0, pad))
        ok = torch.nn.functional.pad(ok, (0, pad))
    pos, ok = pos.view(B, n_tiles, block), ok.view(B, n_tiles, block)
    big = torch.iinfo(torch.long).max // 4
    lo = torch.where(ok, pos, big).amin(dim=(0, 2))
    hi = torch.where(ok, pos, -big).amax(dim=(0, 2))
    return lo, hi, ok.any(dim=2).any(dim=0)

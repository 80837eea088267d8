"""A paged KV pool for serving: the memory of many sequences, handed out in blocks, under a byte budget.

A server's sequences come and go at every decode step and have every length, so preallocating
``max_len`` slots per row (:class:`~kvlab.cache.cache.KVCache`) would waste most of the memory
(vLLM measured 60–80 % in such servers). The pool instead splits each layer's per-token entries
(full K/V, MLA latents) into blocks of ``block_size`` tokens, shared by all sequences; a sequence
holds a list of blocks (its block table) and takes a new one only when it crosses a block
boundary, so at most ``block_size − 1`` slots per sequence and layer stay unused. What a kind keeps
per sequence whatever its length (a rolling window, a linear-attention state, compressed-memory
sums) lives in one of ``max_seqs`` fixed slots instead.

The budget is in bytes: the number of blocks is what is left of it after the fixed slots, divided
by a block's bytes, read off the buffers themselves — equal to ``cache_bytes(cfg, dtype,
kv_quant).per_token × block_size``, the one accounting function (tested) — so a model whose cache
is k× smaller gets k× the blocks and admits about k× the sequences.

One forward call runs on a :class:`PagedBatch` of sequences: a :class:`KVCache` whose layers are
gathered from the pool — a per-token layer, when its attention module asks for it, into a
contiguous ``(B, heads, k_len, D)`` buffer read by the ordinary kernels — and whose new entries
are written back to the sequences' blocks and slots. The gather is a copy of the batch's K/V per
layer and call (one layer at a time, so the extra memory is one layer's); a kernel that reads the
block table directly, as vLLM's PagedAttention does, would avoid it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from kvlab.cache.base import CacheStep
from kvlab.cache.cache import KVCache, integer_key_layers, make_cache_layer
from kvlab.cache.quantized import QuantizedTokenLayer, encode, share_workspace
from kvlab.config.model import ModelConfig
from kvlab.dtypes import KVQuant, parse_dtype
from kvlab.errors import CacheOverflowError, ConfigError

__all__ = ["PagedBatch", "PagedKVPool", "PagedSequence"]


@dataclass(eq=False)
class PagedSequence:
    """One sequence's place in the pool: its blocks, its fixed slot and how many tokens it holds."""

    blocks: list[int] = field(default_factory=list)
    slot: int | None = None
    length: int = 0


class PagedKVPool:
    """Blocks of per-token cache entries and slots of per-sequence state for a model ``cfg``.

    ``budget_bytes`` is the memory of the whole pool. ``max_len`` is the longest sequence it serves
    (it decides which windowed layers roll and sizes compressed-memory slots); ``max_seqs`` bounds
    the sequences held at once (the fixed slots of per-sequence layers are allocated for that many).
    """

    def __init__(self, cfg: ModelConfig, *, budget_bytes: int, max_len: int, max_seqs: int = 64,
                 block_size: int = 16, dtype: str | torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", kv_quant: KVQuant | None = None):
        for name, value in (("budget_bytes", budget_bytes), ("max_len", max_len), ("max_seqs", max_seqs),
                            ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if cfg.pos == "learned" and max_len > cfg.max_seq_len:
            raise ConfigError(f"max_len={max_len} exceeds max_seq_len={cfg.max_seq_len} of a model with learned "
                              f"positions; use max_len <= {cfg.max_seq_len}")
        self.cfg, self.block_size, self.max_len = cfg, block_size, max_len
        self.dtype = parse_dtype(dtype)
        self.kv_quant = kv_quant
        self.integer_keys = integer_key_layers(cfg, kv_quant)
        self.device = torch.device(device)
        # Each layer's cache at batch 1 and full length says what kind of memory it keeps: fields
        # indexed by token slot are paged, everything else is the layer's per-sequence state.
        # layer -> field -> (blocks, block_size, heads, D): token-major inside a block, so that a gathered
        # block table is a (B, tokens, heads, D) view without a second copy
        self.paged: dict[int, dict[str, torch.Tensor]] = {}
        self.fixed: dict[int, object] = {}                        # layer -> a layer of batch max_seqs
        self._blank: dict[int, object] = {}                       # layer -> a fresh layer of batch 1
        self._templates: dict[int, object] = {}                   # layer -> its class's shell (paged layers)
        shapes: dict[int, dict[str, tuple[torch.Size, torch.dtype]]] = {}
        for i in range(cfg.n_layer):
            layer = make_cache_layer(cfg, i, 1, max_len, self.dtype, "meta", self.kv_quant)
            if layer is None:
                continue
            fields = getattr(layer, "token_fields", None)
            if fields is not None:
                shapes[i] = {f: (getattr(layer, f).shape, getattr(layer, f).dtype) for f in fields}
                self._templates[i] = layer
            else:
                self._blank[i] = make_cache_layer(cfg, i, 1, max_len, self.dtype, self.device)
        per_seq = sum(_nbytes(layer) for layer in self._blank.values())
        block_bytes = sum(s[1] * block_size * s[3] * dt.itemsize for f in shapes.values() for s, dt in f.values())
        if per_seq:
            max_seqs = min(max_seqs, budget_bytes // per_seq)
            if max_seqs < 1:
                raise ConfigError(f"a KV budget of {budget_bytes:,} bytes holds no sequence: this model keeps "
                                  f"{per_seq:,} bytes per sequence; raise the budget")
        self.max_seqs = max_seqs
        self.block_bytes = block_bytes
        self.num_blocks = (budget_bytes - max_seqs * per_seq) // block_bytes if block_bytes else 0
        if block_bytes and self.num_blocks < 1:
            raise ConfigError(f"a KV budget of {budget_bytes:,} bytes holds no block of {block_size} tokens "
                              f"({block_bytes:,} bytes); raise the budget or lower the block size")
        for i, fields in shapes.items():
            self.paged[i] = {f: torch.zeros(self.num_blocks, block_size, s[1], s[3], dtype=dt, device=self.device)
                             for f, (s, dt) in fields.items()}
        for i in self._blank:
            self.fixed[i] = make_cache_layer(cfg, i, max_seqs, max_len, self.dtype, self.device)
        share_workspace(cfg, self._templates)        # every batch's views of a layer decode into its slot
        self._free_blocks = list(range(self.num_blocks - 1, -1, -1))     # pop() hands out low ids first
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self.sequences: set[PagedSequence] = set()

    # --------------------------------------------------------------------------- allocation
    @property
    def nbytes(self) -> int:
        """Bytes the pool's buffers hold (its blocks and fixed slots)."""
        return (sum(t.numel() * t.element_size() for f in self.paged.values() for t in f.values())
                + sum(_nbytes(layer) for layer in self.fixed.values()))

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks a sequence of ``n_tokens`` tokens holds (none for a model without per-token layers)."""
        return -(-n_tokens // self.block_size) if self.paged else 0

    def max_sequences(self, n_tokens: int) -> int:
        """How many sequences of ``n_tokens`` tokens the pool holds at once (the planner's question)."""
        per = self.blocks_for(n_tokens)
        return min(self.max_seqs, self.num_blocks // per) if per else self.max_seqs

    def can_hold(self, n_tokens: int) -> bool:
        """Whether the pool could hold one sequence of ``n_tokens`` tokens if it were empty."""
        return n_tokens <= self.max_len and self.blocks_for(n_tokens) <= self.num_blocks

    def new_sequence(self) -> PagedSequence | None:
        """An empty sequence, or None when every fixed slot is taken."""
        if len(self.sequences) >= self.max_seqs:
            return None
        seq = PagedSequence()
        if self.fixed:
            seq.slot = self._free_slots.pop()
            for i, layer in self.fixed.items():
                for name, value in _fields(self._blank[i]).items():
                    getattr(layer, name)[seq.slot] = value[0]
        self.sequences.add(seq)
        return seq

    def reserve(self, seq: PagedSequence, n_tokens: int) -> bool:
        """Give ``seq`` blocks for ``n_tokens`` tokens in all; False (and nothing taken) if too few are free."""
        if n_tokens > self.max_len:
            raise CacheOverflowError(f"a sequence of {n_tokens} tokens is longer than this pool's max_len="
                                     f"{self.max_len}")
        need = self.blocks_for(n_tokens) - len(seq.blocks)
        if need > len(self._free_blocks):
            return False
        seq.blocks.extend(self._free_blocks.pop() for _ in range(max(need, 0)))
        return True

    def release(self, seq: PagedSequence) -> None:
        """Return a sequence's blocks and slot to the pool."""
        if seq not in self.sequences:
            return
        self.sequences.discard(seq)
        self._free_blocks.extend(reversed(seq.blocks))
        seq.blocks = []
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None
        seq.length = 0

    def batch(self, seqs: list[PagedSequence]) -> "PagedBatch":
        """The cache of one forward call over ``seqs`` (in this order)."""
        return PagedBatch(self, seqs)


class PagedBatch(KVCache):
    """The :class:`KVCache` of one forward call over some of a pool's sequences.

    Built for one call: the model prepares, updates and commits it as any cache, and :meth:`commit`
    writes the call's new entries back to the pool (per-token layers write theirs in :meth:`update`).
    """

    def __init__(self, pool: PagedKVPool, seqs: list[PagedSequence]):
        if not seqs:
            raise ConfigError("a paged batch needs at least one sequence")
        self.cfg, self.pool, self.seqs = pool.cfg, pool, seqs
        self.integer_keys = pool.integer_keys
        self.batch_size = len(seqs)
        self.dtype = pool.dtype
        lengths = [s.length for s in seqs]
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=pool.device)
        self._bound, self._uniform = max(lengths), len(set(lengths)) == 1
        self.max_len = pool.max_len
        self._slots = (torch.tensor([s.slot for s in seqs], device=pool.device) if pool.fixed else None)
        # Per-sequence layers are gathered now (linear attention reads its state before updating).
        self.layers = {}
        for i, layer in pool.fixed.items():
            view = copy.copy(layer)
            for name, value in _fields(layer).items():
                setattr(view, name, value.index_select(0, self._slots))
            self.layers[i] = view
        self._written: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._tables: dict[int, torch.Tensor] = {}          # k_len -> block table (one per call)

    def prepare(self, n_tokens: int, attention_mask: torch.Tensor | None = None) -> CacheStep:
        if self.pool.paged:
            adds = attention_mask.sum(1).tolist() if attention_mask is not None else [n_tokens] * self.batch_size
            short = [i for i, (s, a) in enumerate(zip(self.seqs, adds))
                     if s.length + a > len(s.blocks) * self.pool.block_size]
            if short:
                raise CacheOverflowError(f"sequence(s) {short} of this batch have no blocks reserved for their "
                                         f"new token(s); reserve them with pool.reserve() first")
        # Each row fits its blocks (checked above, and by reserve() against the pool's max_len); the
        # call's key span (longest row + the padded width) may exceed max_len in a ragged call.
        self.max_len = max(self.pool.max_len, self._bound + n_tokens)
        return super().prepare(n_tokens, attention_mask)

    def _table(self, k_len: int) -> torch.Tensor:
        """``(B, ceil(k_len / block_size))`` block ids, padded with block 0 (masked by the row lengths);
        built once per call, for the first layer that asks."""
        if k_len not in self._tables:
            width = -(-k_len // self.pool.block_size)
            rows = [(s.blocks + [0] * width)[:width] for s in self.seqs]
            self._tables[k_len] = torch.tensor(rows, dtype=torch.long, device=self.pool.device)
        return self._tables[k_len]

    def _gather(self, storage: torch.Tensor, table: torch.Tensor, k_len: int) -> torch.Tensor:
        """``(B, heads, k_len, D)``: a strided view of one copy of the rows' blocks."""
        B, W = table.shape
        _, bs, H, D = storage.shape
        return storage[table].reshape(B, W * bs, H, D).transpose(1, 2)[:, :, :k_len]

    def _new_entries(self, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position, block, offset) of every token this call adds."""
        if self._written is None:
            old = self.lengths.tolist()
            new = step.new_lengths.tolist()
            rows = [b for b in range(self.batch_size) for _ in range(new[b] - old[b])]
            pos = [p for b in range(self.batch_size) for p in range(old[b], new[b])]
            bs = self.pool.block_size
            blocks = [self.seqs[b].blocks[p // bs] for b, p in zip(rows, pos)]
            dev = self.pool.device
            self._written = (torch.tensor(rows, dtype=torch.long, device=dev),
                             torch.tensor(pos, dtype=torch.long, device=dev),
                             torch.tensor(blocks, dtype=torch.long, device=dev),
                             torch.tensor(pos, dtype=torch.long, device=dev) % bs)
        return self._written

    def update(self, layer: int, *new: torch.Tensor, step: CacheStep, stored: bool = False) -> tuple:
        storage = self.pool.paged.get(layer)
        if storage is None:
            return self.layers[layer].update(*new, step=step)
        table = self._table(step.k_len)
        view = copy.copy(self.pool._templates[layer])
        for name, buf in storage.items():
            setattr(view, name, self._gather(buf, table, step.k_len))
        out = view.store(*new, step=step) if stored and isinstance(view, QuantizedTokenLayer) else \
            view.update(*new, step=step)
        rows, pos, blocks, offsets = self._new_entries(step)
        for name, buf in storage.items():
            buf[blocks, offsets] = getattr(view, name)[rows, :, pos]
        return out

    def write_prefix(self, per_layer: dict[int, tuple[torch.Tensor, ...]]) -> None:
        """Prefix tuning: the trained prefixes go into slots ``[0, P)`` of every sequence's blocks."""
        if not self.is_empty:
            raise ConfigError("a prefix goes into an empty cache")
        n = next(iter(per_layer.values()))[0].shape[2]
        for seq in self.seqs:
            if len(seq.blocks) * self.pool.block_size < n:
                raise CacheOverflowError(f"the prefix has {n} tokens but a sequence has blocks for "
                                         f"{len(seq.blocks) * self.pool.block_size}")
        bs = self.pool.block_size
        pos = torch.arange(n, device=self.pool.device)
        for layer, entries in per_layer.items():
            storage = self.pool.paged.get(layer)
            if storage is None:
                raise ConfigError(f"layer {layer} keeps no per-token entries for a prefix")
            template = self.pool._templates[layer]
            if isinstance(template, QuantizedTokenLayer):     # stored as the pool stores tokens: codes and scales
                fields = {}
                for f, x in zip(template.fields, entries):
                    codes, scales = encode(x, template.formats[f])
                    fields[f + "_codes"] = codes
                    if scales is not None:
                        fields[f + "_scales"] = scales
            else:
                fields = dict(zip(storage, entries))
            for seq in self.seqs:
                blocks = torch.tensor(seq.blocks, dtype=torch.long, device=self.pool.device)[pos // bs]
                for name, buf in storage.items():
                    buf[blocks, pos % bs] = fields[name][0].transpose(0, 1).to(buf.dtype)
        self.lengths = torch.full_like(self.lengths, n)
        self._bound, self._uniform = n, True

    def commit(self, step: CacheStep, n_tokens: int) -> None:
        super().commit(step, n_tokens)
        for i, view in self.layers.items():
            for name, value in _fields(view).items():
                getattr(self.pool.fixed[i], name).index_copy_(0, self._slots, value)
        for seq, n in zip(self.seqs, self.lengths.tolist()):
            seq.length = n
        self._written = None
        self._tables.clear()

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes


def _fields(layer) -> dict[str, torch.Tensor]:
    """The tensors of a per-sequence cache layer, each with the batch as its first dimension."""
    return {name: value for name, value in vars(layer).items() if isinstance(value, torch.Tensor)}


def _nbytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in _fields(layer).values())

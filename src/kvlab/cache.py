"""The KV cache: one preallocated K and V buffer per KV-producing layer, sized by ``n_kv_head``.

Layout: ``(B, n_kv_head, max_len, head_dim)`` per buffer. Row ``b`` holds its tokens in slots
``[0, lengths[b])`` in order, so a token's slot *is* its position: padding in the input is
never written (a left-padded prompt is compacted on the way in), each row's RoPE positions
are simply its slot indices, and kernels see ragged rows as plain per-row lengths.

CLA consumer layers have no buffers: they attend to their producer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.config import ModelConfig
from kvlab.dtypes import parse_dtype
from kvlab.errors import CacheOverflowError, ConfigError


@dataclass
class CacheStep:
    """Where the tokens of one forward call go, computed once and used by every layer."""

    q_pos: torch.Tensor                 # (B|1, T) positions (= slots) of the new tokens
    q_valid: torch.Tensor | None        # (B, T) False for padding tokens; None if no padding
    k_len: int                          # keys to read: slots [0, k_len) cover every row
    k_valid: torch.Tensor | None        # (B, k_len) slot < new length; None if rows are uniform
    new_lengths: torch.Tensor           # (B,) lengths after this step
    uniform_start: int | None           # all rows start at this length (fast slice writes)
    write_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (row, token, slot)


class KVCache:
    """Preallocated KV buffers for the producer layers of ``cfg``.

    ``lengths`` (B,) counts the tokens each row holds. The cache also keeps, in Python, an
    upper bound on the longest row and whether all rows have the same length, so that decode
    steps never need to read ``lengths`` back from the device.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu"):
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
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.keys = {i: torch.zeros(shape, dtype=self.dtype, device=device) for i in cfg.kv_producers}
        self.values = {i: torch.zeros(shape, dtype=self.dtype, device=device) for i in cfg.kv_producers}
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._bound = 0          # >= lengths.max()
        self._uniform = True     # all rows hold exactly _bound tokens

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the K/V buffers: ``kv_bytes_per_token(dtype) × batch_size × max_len``."""
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def assume_filled(self, n_tokens: int) -> None:
        """Declare that every row holds ``n_tokens`` tokens already in the buffers.

        For benchmarks and tests that write the buffers directly instead of prefilling.
        """
        if not 0 <= n_tokens <= self.max_len:
            raise ConfigError(f"n_tokens={n_tokens} must be in [0, max_len={self.max_len}]")
        # New tensors rather than in-place updates: after a step under torch.inference_mode the
        # lengths are an inference tensor, which may not be modified in place outside it.
        self.lengths = torch.full_like(self.lengths, n_tokens)
        self._bound, self._uniform = n_tokens, True

    def reset(self) -> None:
        self.assume_filled(0)

    @property
    def is_empty(self) -> bool:
        return self._bound == 0

    def write_prefix(self, per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill slots ``[0, P)`` of every row with trained prefixes ``(1|B, n_kv_head, P, D)`` per
        producer (prefix tuning); the prompt then starts at position ``P``."""
        if not self.is_empty:
            raise ConfigError("a prefix goes into an empty cache; call cache.reset() first")
        n = next(iter(per_layer.values()))[0].shape[2]
        if n > self.max_len:
            raise CacheOverflowError(f"the prefix has {n} tokens but the cache holds max_len={self.max_len}")
        for layer, (k, v) in per_layer.items():
            self.keys[layer][:, :, :n] = k.to(self.dtype)
            self.values[layer][:, :, :n] = v.to(self.dtype)
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
            from kvlab.attention.masks import positions_from_attention_mask

            q_valid = attention_mask.bool()
            q_pos = positions_from_attention_mask(q_valid, start=self.lengths)
            new_lengths = self.lengths + q_valid.sum(dim=1)
            rows, toks = q_valid.nonzero(as_tuple=True)
            write_index = (rows, toks, q_pos[rows, toks])
        k_valid = torch.arange(k_len, device=dev).unsqueeze(0) < new_lengths.unsqueeze(1)
        return CacheStep(q_pos=q_pos, q_valid=q_valid, k_len=k_len, k_valid=k_valid,
                         new_lengths=new_lengths, uniform_start=None, write_index=write_index)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``k, v (B, n_kv_head, T, D)`` of a producer layer; return its K/V so far."""
        kc, vc = self.keys[layer], self.values[layer]
        if step.uniform_start is not None:
            s = step.uniform_start
            kc[:, :, s:s + k.shape[2]] = k
            vc[:, :, s:s + v.shape[2]] = v
        else:
            rows, toks, slots = step.write_index
            # Advanced indices on dims 0 and 2 with a slice between: the indexed result is
            # (*index_shape, n_kv_head, D), matching k[rows, :, toks].
            kc[rows, :, slots] = k[rows, :, toks].to(kc.dtype)
            vc[rows, :, slots] = v[rows, :, toks].to(vc.dtype)
        return kc[:, :, :step.k_len], vc[:, :, :step.k_len]

    def read(self, layer: int, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, :step.k_len], self.values[layer][:, :, :step.k_len]

    def commit(self, step: CacheStep, n_tokens: int) -> None:
        """Make the step's tokens part of the cache (after every layer has written)."""
        self.lengths = step.new_lengths
        self._bound += n_tokens
        if step.q_valid is not None:
            self._uniform = False

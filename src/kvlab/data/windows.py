"""Training data: documents -> tokenized shards on disk -> windows of ``seq_len + 1`` tokens.

A corpus split is tokenized once into a flat ``numpy`` file (uint16 when the vocabulary fits,
else uint32), documents joined with the tokenizer's EOS between them, and cached under a name
derived from the content hash of the documents and of the tokenizer — change either and the cache
is rebuilt; a file is written to a temporary name and renamed, so a half-written cache is never
read. Windows are drawn either sequentially or at random offsets; the offsets of batch ``i`` depend
only on ``(seed, i)``, so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvlab.data.corpus import Document
from kvlab.data.sources import split_documents
from kvlab.errors import ConfigError
from kvlab.progress import progress as show_progress

DEFAULT_CACHE = Path(os.environ.get("KVLAB_CACHE", Path.home() / ".cache" / "kvlab"))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer's behaviour: its serialized form (HF) or its kind (bytes)."""
    inner = getattr(tokenizer, "tokenizer", None)
    text = inner.to_str() if inner is not None else f"{type(tokenizer).__name__}:{tokenizer.vocab_size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def corpus_key(docs: Sequence[Document], tokenizer) -> str:
    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()[:20]


@dataclass
class TokenFile:
    """A tokenized corpus split on disk, opened as a read-only memory map."""

    path: Path
    tokens: np.ndarray
    n_documents: int

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_to_file(docs: Sequence[Document], tokenizer, *, cache_dir: str | Path | None = None,
                     progress: bool = True) -> TokenFile:
    """Tokenize ``docs`` (EOS after each) into a cached flat token file; reuse it if present."""
    if not docs:
        raise ConfigError("no documents to tokenize")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token to separate documents with")
    dtype = token_dtype(tokenizer.vocab_size)
    cache_dir = Path(cache_dir or DEFAULT_CACHE) / "tokens"
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = corpus_key(docs, tokenizer)
    path = cache_dir / f"{key}.{dtype.name}.bin"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return TokenFile(path, np.memmap(path, dtype=dtype, mode="r"), meta["n_documents"])
    chunks = []
    for d in show_progress(docs, "tokenizing", progress):
        ids = tokenizer.encode(d.text, add_special_tokens=False)
        chunks.append(np.asarray([*ids, eos], dtype=dtype))
    tokens = np.concatenate(chunks)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tokens.tofile(tmp)
    os.replace(tmp, path)
    meta_path.write_text(json.dumps({"n_documents": len(docs), "n_tokens": int(len(tokens)), "dtype": dtype.name}))
    return TokenFile(path, np.memmap(path, dtype=dtype, mode="r"), len(docs))


class Windows:
    """Batches of ``(inputs, targets)``, each ``(batch_size, seq_len)``, from a token file.

    ``mode='random'``: offsets drawn uniformly, batch ``i`` from ``default_rng([seed, i])``.
    ``mode='sequential'``: consecutive non-overlapping windows, wrapping around at the end.
    Either way :meth:`batch` is a pure function of ``i``: a resumed run needs only its step.
    ``rank``/``world_size`` give each process of a distributed run its own rows of a global batch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, mode: str = "random", seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if mode not in ("random", "sequential"):
            raise ConfigError(f"mode={mode!r} is not one of ['random', 'sequential']")
        if len(tokens) < seq_len + 2:
            raise ConfigError(f"the corpus has {len(tokens)} tokens, fewer than one window of seq_len+1="
                              f"{seq_len + 1}; use a smaller --seq-len or more data")
        if batch_size % world_size:
            raise ConfigError(f"global batch_size={batch_size} is not divisible by world_size={world_size}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.mode, self.seed, self.rank, self.world_size = mode, seed, rank, world_size

    def offsets(self, i: int) -> np.ndarray:
        """Start offsets of the *global* batch ``i`` (all ranks)."""
        span = len(self.tokens) - self.seq_len - 1
        if self.mode == "random":
            return np.random.default_rng([self.seed, i]).integers(0, span + 1, size=self.batch_size)
        n_windows = (len(self.tokens) - 1) // self.seq_len
        idx = (i * self.batch_size + np.arange(self.batch_size)) % n_windows
        return idx * self.seq_len

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = self.batch_size // self.world_size
        offs = self.offsets(i)[self.rank * per_rank:(self.rank + 1) * per_rank]
        rows = np.stack([np.asarray(self.tokens[o:o + self.seq_len + 1], dtype=np.int64) for o in offs])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


class MixedWindows:
    """Batches like :class:`Windows`'s (``mode='random'``), each row drawn from one of several token
    streams with probability its weight: the shares of a ``--data`` mix hold whatever the streams'
    sizes (a small stream repeats, a large one is sampled). Batch ``i`` is a pure function of ``i``."""

    def __init__(self, streams: Sequence[np.ndarray], weights: Sequence[float], seq_len: int, batch_size: int, *,
                 names: Sequence[str] | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        names = names or [f"part {k + 1}" for k in range(len(streams))]
        for name, tokens in zip(names, streams):
            if len(tokens) < seq_len + 2:
                raise ConfigError(f"--data {name} has {len(tokens)} tokens, fewer than one window of seq_len+1="
                                  f"{seq_len + 1}; give it more text or use a smaller --seq-len")
        if batch_size % world_size:
            raise ConfigError(f"global batch_size={batch_size} is not divisible by world_size={world_size}")
        total = float(sum(weights))
        self.streams, self.p = list(streams), np.asarray(weights, dtype=np.float64) / total
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        which = rng.choice(len(self.streams), size=self.batch_size, p=self.p)
        offsets = [int(rng.integers(0, len(self.streams[w]) - self.seq_len)) for w in which]
        per_rank = self.batch_size // self.world_size
        mine = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows = np.stack([np.asarray(self.streams[which[r]][offsets[r]:offsets[r] + self.seq_len + 1], dtype=np.int64)
                         for r in mine])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


class TokenMix:
    """Training text as named token streams with their shares of the windows (``weight`` None for every
    stream: one stream, the texts one after another, each in proportion to its size)."""

    def __init__(self, parts: Sequence[tuple[str, np.ndarray, float | None]]):
        if not parts:
            raise ConfigError("a text mix needs at least one part")
        self.parts = list(parts)

    @property
    def weighted(self) -> bool:
        return self.parts[0][2] is not None and len(self.parts) > 1

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for _, t, _ in self.parts)

    @property
    def shortest(self) -> int:
        """Tokens of the stream a window must fit in (the whole text when the parts are concatenated)."""
        return min(len(t) for _, t, _ in self.parts) if self.weighted else self.n_tokens

    def windows(self, seq_len: int, batch_size: int, *, mode: str = "random", seed: int = 0, rank: int = 0,
                world_size: int = 1):
        """:class:`Windows` over the text (``mode`` as it takes), or :class:`MixedWindows` for a weighted
        mix (drawn at random: a mix has no one order to read in)."""
        if not self.weighted:
            streams = [np.asarray(t) for _, t, _ in self.parts]
            tokens = streams[0] if len(streams) == 1 else np.concatenate(streams)
            return Windows(tokens, seq_len, batch_size, mode=mode, seed=seed, rank=rank, world_size=world_size)
        if mode != "random":
            raise ConfigError(f"a weighted --data mix draws its windows at random; data mode {mode!r} reads one text "
                              f"in order (give one source, or drop the weights)")
        return MixedWindows([t for _, t, _ in self.parts], [w for _, _, w in self.parts], seq_len, batch_size,
                            names=[n for n, _, _ in self.parts], seed=seed, rank=rank, world_size=world_size)


def calibration_batches(tokenizer, n_tokens: int, *, seq_len: int = 512, batch_size: int = 8, data: str = "builtin",
                        seed: int = 0, cache_dir: str | Path | None = None,
                        text: TokenMix | None = None) -> list[torch.Tensor]:
    """About ``n_tokens`` tokens of calibration text as ``(batch, seq_len)`` batches: random windows
    of the training split only (``data``: any source :func:`kvlab.data.corpus.split_documents` reads,
    its train side; or ``text``, a mix already tokenized), so that evaluation text never calibrates a
    conversion."""
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ConfigError(f"calibration tokens={n_tokens!r} must be a positive integer")
    if text is None:
        docs = split_documents(data, "train", tokenizer=tokenizer)
        text = TokenMix([(data, tokenize_to_file(docs, tokenizer, cache_dir=cache_dir, progress=False).tokens, None)])
    seq_len = min(seq_len, n_tokens, text.shortest - 2)
    rows = max(1, -(-n_tokens // seq_len))
    x = text.windows(seq_len, rows, seed=seed).batch(0)[0]
    return [x[i:i + batch_size] for i in range(0, rows, batch_size)]

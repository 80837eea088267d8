"""The text of a ``kvlab shrink`` run, from ``--data`` (:mod:`kvlab.data.sources`): what calibrates and
ranks the candidates, what recovery trains on, and what the final numbers are measured on.

- **Reference text** (calibration, the key balance, the ranking's proxy windows, the prompts of
  generated text): the train side of the parts that are text — the user's files, the built-in or library
  corpus — with the mix's weights; generated text is the model's own, so it is left out here.
- **Training text**: every part, generated text included (sampled by the original once, kept in
  ``OUT/work`` for ``--resume``), with the mix's weights (:class:`kvlab.data.windows.TokenMix`).
- **Validation text**: the held-out side of the user's files when ``--data`` names any (the number a
  user asked for: quality on their text), else the built-in corpus's validation split.

``mixed`` is ``builtin,generated``: the built-in train split and the generated text, as they come.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvlab.data.corpus import Document
from kvlab.data.sources import NAMED_SOURCES, DataPart, data_files, document_sides, parse_data, split_documents
from kvlab.data.windows import TokenMix, tokenize_to_file
from kvlab.errors import ConfigError
from kvlab.recipes.shrink.evaluation import duration

# Held-out tokens the final evaluation needs at least (a few windows' worth): fewer and the number
# would say more about the sample than about the model.
MIN_VALIDATION_TOKENS = 512
_ALIASES = {"mixed": "builtin,generated"}


def data_parts(spec: str) -> tuple[DataPart, ...]:
    """``--data`` as parts (:func:`kvlab.data.sources.parse_data`; ``mixed`` = ``builtin,generated``)."""
    return parse_data(_ALIASES.get(spec, spec))


def check_data(spec: str) -> tuple[DataPart, ...]:
    """``--data``'s parts, or one line now if a part names no file (before a run directory exists)."""
    parts = data_parts(spec)
    for p in parts:
        if p.source not in NAMED_SOURCES:
            data_files(p.source)
    return parts


class RunText:
    """The run's text (module docstring), tokenized with ``tokenizer``; ``generate`` samples the
    original's text when the mix has a ``generated`` part (called once, its tokens kept in ``work``).
    Each of the user's files must hold one training ``window`` on its train side, and a few windows'
    worth held out (:data:`MIN_VALIDATION_TOKENS`): checked here, before any conversion."""

    def __init__(self, spec: str, tokenizer, *, work: Path, generated_tokens: int, window: int,
                 generate: Callable[[int, np.ndarray], np.ndarray], log: Callable[[str], None]):
        self.spec, self.tok, self.work, self.log = spec, tokenizer, work, log
        self.parts = data_parts(spec)
        self.generated_tokens, self._generate = generated_tokens, generate
        self.user_parts = [p for p in self.parts if p.source not in NAMED_SOURCES]
        texts = [p for p in self.parts if p.source != "generated"] or [DataPart("builtin")]
        if any(p.source == "library" for p in texts):
            self.log("reading the library corpus (the first time: about a minute, then cached)...")
        sides = {p.source: document_sides(p.source, tokenizer=tokenizer) for p in texts}   # each file read once
        self._train = {source: self._tokens(source, side["train"]) for source, side in sides.items()}
        self.reference = TokenMix([(p.source, self._train[p.source], p.weight) for p in texts])
        if self.user_parts:
            self.validation = [d for p in self.user_parts for d in sides[p.source]["validation"]]
            self.validation_name = f"the held-out split of --data {', '.join(p.source for p in self.user_parts)}"
            held = sum(len(tokenizer.encode(d.text, add_special_tokens=False)) for d in self.validation)
            if held < MIN_VALIDATION_TOKENS:
                raise ConfigError(f"--data {spec!r}: its held-out split has {held:,} tokens, fewer than the "
                                  f"{MIN_VALIDATION_TOKENS:,} a final score needs; give more text")
        else:
            self.validation = split_documents("builtin", "validation")
            self.validation_name = "the built-in validation split"
        for p in self.user_parts:
            n = len(self._train[p.source])
            if n < window + 2:             # what kvlab.data.windows needs for one window and its targets
                raise ConfigError(f"--data {p.source}: its train side has {n:,} tokens, fewer than one training "
                                  f"window of {window + 2:,}; give more text (or a smaller --seq-len)")
            self.log(f"--data {p.source}: {n:,} training tokens; validation on its held-out split")

    def _tokens(self, source: str, docs: list[Document]) -> np.ndarray:
        tokens = tokenize_to_file(docs, self.tok, progress=False).tokens
        if source == "library":
            self.log(f"  {len(tokens):,} tokens of training text")
        return tokens

    @property
    def prompts(self) -> np.ndarray:
        """Tokens to draw generation prompts from: the first text part's train side."""
        return self.reference.parts[0][1]

    def training(self) -> TokenMix:
        """The text recovery trains on: every part, generated text sampled the first time."""
        return TokenMix([(p.source, self._generated() if p.source == "generated" else self._train[p.source],
                          p.weight) for p in self.parts])

    def _generated(self) -> np.ndarray:
        path = self.work / "generated.npy"
        if not path.is_file():
            self.log(f"generating {self.generated_tokens:,} tokens of training text with the original model...")
            t = time.perf_counter()
            generated = self._generate(self.generated_tokens, self.prompts)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path.with_suffix(".tmp.npy"), generated)
            path.with_suffix(".tmp.npy").replace(path)
            self.log(f"  {len(generated):,} tokens in {duration(time.perf_counter() - t)}")
        return np.load(path)

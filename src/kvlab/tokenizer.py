"""Tokenizers kvlab can save in a checkpoint.

:class:`ByteTokenizer` maps UTF-8 bytes to ids 0..255 and adds BOS/EOS/PAD after them; it needs
no training and suits small models trained from scratch. Real models bring HF tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvlab.errors import CheckpointError


class ByteTokenizer:
    kind = "bytes"
    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "kvlab.ByteTokenizer", "bos_token_id": self.bos_token_id,
             "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}, indent=2) + "\n")


def load_tokenizer(directory: str | Path) -> ByteTokenizer | None:
    """The tokenizer saved in a checkpoint directory, or None if it has none."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if data.get("tokenizer_class") == "kvlab.ByteTokenizer":
        return ByteTokenizer()
    raise CheckpointError(f"{path}: tokenizer_class {data.get('tokenizer_class')!r} is not supported")

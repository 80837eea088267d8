"""Tokenizers: HF ``tokenizers`` for real models, a byte-level one for models trained from scratch.

Both expose the same small interface: ``encode(text, add_special_tokens=True)``, ``decode(ids)``,
``apply_chat_template(messages, add_generation_prompt=True)``, ``bos/eos/pad_token_id``,
``vocab_size`` and ``save(directory)``. A checkpoint directory's ``tokenizer_config.json`` says
which one it holds; :func:`load_tokenizer` reads either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from kvlab.errors import CheckpointError, ConfigError

Message = dict[str, Any]


def render_chat_template(template: str, messages: Sequence[Message], *, add_generation_prompt: bool,
                         bos_token: str | None, eos_token: str | None, **extra: Any) -> str:
    """Render a HF chat template the way transformers does: a sandboxed jinja2 environment with
    ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and ``strftime_now`` available."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token or "", eos_token=eos_token or "", **extra)
    except TemplateError as e:
        raise ConfigError(f"the chat template rejected these messages: {e}") from None


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the special tokens and chat template of its model."""

    kind = "hf"

    def __init__(self, tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            tokenize: bool = True, **extra: Any) -> list[int] | str:
        """The model's own chat format; token ids (special tokens come from the template) or text."""
        if not self.chat_template:
            raise ConfigError("this tokenizer has no chat template; encode the prompt as plain text instead")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # --------------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> None:
        """``tokenizer.json`` + ``tokenizer_config.json`` in the layout HF's AutoTokenizer reads."""
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dir(cls, directory: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer

        directory = Path(directory)
        try:
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"{directory / 'tokenizer.json'} cannot be read: {e}") from None
        config: dict[str, Any] = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text())
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():      # newer transformers write it apart
            template = (directory / "chat_template.jinja").read_text()
        if isinstance(template, list):                          # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token(name: str) -> str | None:
            value = config.get(name)
            return value.get("content") if isinstance(value, dict) else value

        return cls(tok, bos_token=token("bos_token"), eos_token=token("eos_token"),
                   pad_token=token("pad_token"), chat_template=template)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS 256, EOS 257, PAD 258. Needs no training."""

    kind = "bytes"
    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            tokenize: bool = True, **extra: Any) -> list[int] | str:
        """A fixed chat format for byte-level models: ``<|role|>\n`` + content, each turn ending
        in ``\n`` except an assistant turn, which ends in EOS (so generation stops there)."""
        ids: list[int] = []
        for m in messages:
            ids += self.encode(f"<|{m['role']}|>\n{m['content']}", add_special_tokens=False)
            ids += [self.eos_token_id] if m["role"] == "assistant" else self.encode("\n", add_special_tokens=False)
        if add_generation_prompt:
            ids += self.encode("<|assistant|>\n", add_special_tokens=False)
        return ids if tokenize else self.decode(ids)

    def save(self, directory: str | Path) -> None:
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "kvlab.ByteTokenizer", "bos_token_id": self.bos_token_id,
             "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}, indent=2) + "\n")


Tokenizer = HFTokenizer | ByteTokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer saved in a checkpoint directory, or None if it has none."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(directory)
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if data.get("tokenizer_class") == "kvlab.ByteTokenizer":
        return ByteTokenizer()
    raise CheckpointError(f"{path}: tokenizer_class {data.get('tokenizer_class')!r} has no tokenizer.json beside it; "
                          f"kvlab reads HF fast tokenizers (tokenizer.json) and its own byte tokenizer")

"""The built-in English corpus: text every Python installation already has.

Documents:
- each topic of the interactive help, ``pydoc_data.topics.topics`` (the language reference
  sections: "assignment", "for", "exceptions"...), one document per topic;
- for each public pure-Python standard-library module (``sys.stdlib_module_names``, not starting
  with ``_``), one document made of its module docstring followed by the docstrings of its public
  classes, functions and methods in source order. Sources are parsed with ``ast``, never imported.

Split: a document goes to validation when the first byte of sha256(its id) is below 26 (~10 %),
else to train — fixed by the document ids alone, so it never depends on the order of discovery.
The corpus differs between Python versions; :func:`corpus_fingerprint` identifies the text used.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache

from kvlab.errors import ConfigError

SPLITS = ("train", "validation")
_SKIP_MODULES = {"antigravity", "this"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str

    @property
    def split(self) -> str:
        return "validation" if hashlib.sha256(self.id.encode()).digest()[0] < 26 else "train"


def _docstrings_in_source_order(node: ast.AST) -> list[str]:
    out = []
    doc = ast.get_docstring(node, clean=True) if isinstance(
        node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if doc:
        out.append(doc)
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
            out.extend(_docstrings_in_source_order(child))
    return out


def _module_documents() -> list[Document]:
    docs = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            with open(spec.origin, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        parts = _docstrings_in_source_order(tree)
        if parts:
            docs.append(Document(f"module:{name}", "\n\n".join(parts)))
    return docs


@lru_cache(maxsize=1)
def builtin_documents() -> tuple[Document, ...]:
    from pydoc_data.topics import topics

    docs = [Document(f"topic:{k}", v.strip()) for k, v in sorted(topics.items()) if v.strip()]
    return tuple(docs + _module_documents())


def builtin_corpus(split: str = "validation") -> list[Document]:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {list(SPLITS)}")
    return [d for d in builtin_documents() if d.split == split]


def corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()[:16]


def read_documents(source: str, field: str = "text") -> list[Document]:
    """``builtin`` (validation split), ``builtin:train``, a text file, a ``.jsonl`` file (one JSON
    object per line, text under ``field``) or a directory of ``.txt`` files, each file one document."""
    import json
    from pathlib import Path

    if source == "builtin" or source.startswith("builtin:"):
        return builtin_corpus(source.partition(":")[2] or "validation")
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ConfigError(f"data directory {source!r} holds no .txt files")
        return [Document(str(f.relative_to(path)), f.read_text(encoding="utf-8")) for f in files]
    if not path.is_file():
        raise ConfigError(f"data {source!r} not found: give a text file, a .jsonl file, a directory of .txt "
                          f"files, or 'builtin'")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                docs.append(Document(f"{path.name}:{i + 1}", json.loads(line)[field]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{source} line {i + 1} is not a JSON object with a {field!r} field") from None
        return docs
    return [Document(path.name, path.read_text(encoding="utf-8"))]

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

The larger ``library`` corpus (:func:`library_corpus`, data source ``library`` / ``library:train``)
adds, after the built-in documents, the docstrings of kvlab's own runtime dependencies as installed
by ``pip install kvlab`` (:data:`LIBRARY_PACKAGES`: one document per source file, test directories
left out) — about 14 M characters, 3.8 M SmolLM2 tokens in its train split (14 times the built-in
train split) with torch 2.13, for
uptraining budgets that would otherwise pass over the same text many times. A docstring is kept
only the first time its exact text appears (the built-in documents come first), so no passage of
the built-in validation split reappears in the library's train split. Licences: torch, numpy,
sympy, networkx and jinja2 are BSD-3-Clause, matplotlib is under the PSF-based Matplotlib licence,
rich is MIT; the text is read from the installed packages and never redistributed.
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
# Runtime dependencies of kvlab (and of torch) whose sources ship their documentation.
LIBRARY_PACKAGES = ("torch", "numpy", "sympy", "networkx", "matplotlib", "jinja2", "rich")
_TEST_DIRS = {"test", "tests", "testing"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    # The side a document was assigned to (kvlab.data.sources.held_out); None: by the hash of its id.
    held_out: bool | None = None

    @property
    def split(self) -> str:
        if self.held_out is not None:
            return "validation" if self.held_out else "train"
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


def _parsed_docstrings(path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return _docstrings_in_source_order(ast.parse(f.read()))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []


@lru_cache(maxsize=1)
def _stdlib_docstrings() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(module name, its docstrings in source order) for each public pure-Python stdlib module."""
    out = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        parts = _parsed_docstrings(spec.origin)
        if parts:
            out.append((name, tuple(parts)))
    return tuple(out)


def _builtin_sources() -> list[tuple[str, tuple[str, ...]]]:
    """(document id, the passages it is made of): the help topics, then the stdlib modules."""
    from pydoc_data.topics import topics

    return ([(f"topic:{k}", (v.strip(),)) for k, v in sorted(topics.items()) if v.strip()]
            + [(f"module:{name}", parts) for name, parts in _stdlib_docstrings()])


@lru_cache(maxsize=1)
def builtin_documents() -> tuple[Document, ...]:
    return tuple(Document(doc_id, "\n\n".join(parts)) for doc_id, parts in _builtin_sources())


def _package_files(package: str) -> list[tuple[str, str]]:
    """(document id, path) of each source file of an installed package, tests left out."""
    from pathlib import Path

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    out = []
    for root in spec.submodule_search_locations:
        root = Path(root)
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root)
            if not _TEST_DIRS.intersection(rel.parts[:-1]) and not rel.name.startswith("test_"):
                out.append((f"package:{package}/{rel.as_posix()}", str(f)))
    return out


@lru_cache(maxsize=1)
def library_documents() -> tuple[Document, ...]:
    """The built-in documents, then one document per source file of :data:`LIBRARY_PACKAGES`
    made of the docstrings not seen before (exact text), in source order."""
    docs = list(builtin_documents())
    seen = {p for _, parts in _builtin_sources() for p in parts}
    for package in LIBRARY_PACKAGES:
        for doc_id, path in _package_files(package):
            parts = [p for p in _parsed_docstrings(path) if p not in seen]
            seen.update(parts)
            if parts:
                docs.append(Document(doc_id, "\n\n".join(parts)))
    return tuple(docs)


def _split(docs, split: str) -> list[Document]:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {list(SPLITS)}")
    return [d for d in docs if d.split == split]


def builtin_corpus(split: str = "validation") -> list[Document]:
    return _split(builtin_documents(), split)


def library_corpus(split: str = "train") -> list[Document]:
    return _split(library_documents(), split)


def corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()[:16]


def read_utf8(path) -> str:
    """A file's UTF-8 text, or one clear error (binary or another encoding)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); give a UTF-8 "
                          f"text file (e.g. iconv -t UTF-8)") from None

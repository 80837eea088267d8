"""The user's own text, as ``--data`` names it: files, directories and globs of UTF-8 text, JSONL of
``{"text": …}`` or of chat ``{"messages": […]}`` records, and weighted mixes of these with the
built-in corpora (``--data notes/:0.7,builtin:0.3``).

- **A file** is one document; a ``.jsonl`` file is one document per line: its ``text`` field, or its
  ``messages`` rendered in the model's own chat format (the tokenizer's chat template), so a model
  distils on conversations as it will serve them.
- **A directory** is every text file under it (:data:`TEXT_SUFFIXES`, and ``.jsonl``), in path order; a
  **glob** (``logs/**/*.txt``) every file it matches.
- **A held-out split** is kept apart automatically: about :data:`VALIDATION_SHARE` of the text, whole
  documents taken in the order of their names' hashes (so the split does not depend on the order of
  reading), none that would take the side past twice the share; where documents are too few or too
  uneven for that, the tail of the largest one (from a line start) is held out instead. Conversions
  calibrate and train on the train side; final scores use the validation side.
- **A mix** (:func:`parse_data`) is parts with weights, each weight the share of training windows
  drawn from that part (:class:`kvlab.data.windows.TokenMix`): a small part repeats, a large one is
  sampled, whatever their sizes. Without weights the parts' text is used as it comes, in proportion
  to its size.

Bad data is one clear line naming the file and the fix: no file, no text, not UTF-8, a JSONL line that is
not a JSON object with one of the two keys, a chat record in a model without a chat template.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from kvlab.data.corpus import SPLITS, Document, builtin_corpus, library_corpus, read_utf8
from kvlab.errors import ConfigError

__all__ = ["NAMED_SOURCES", "TEXT_SUFFIXES", "VALIDATION_SHARE", "DataPart", "data_files", "held_out", "parse_data",
           "document_sides", "read_documents", "split_documents", "user_documents"]

# Sources with a name instead of a path: the built-in corpus, the library corpus, and text the
# original model generates (shrink only: it needs the model).
NAMED_SOURCES = ("builtin", "library", "generated")
# Files read from a directory (a file named directly is read whatever its suffix).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
# The share of a single document held out for validation.
VALIDATION_SHARE = 0.1
_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class DataPart:
    """One source of a ``--data`` mix: a name of :data:`NAMED_SOURCES` or a path/glob, with its share of
    the training windows (``None``: the parts are used as they come, in proportion to their text)."""

    source: str
    weight: float | None = None


def parse_data(spec: str, named: tuple[str, ...] = NAMED_SOURCES) -> tuple[DataPart, ...]:
    """``'a.jsonl:0.7,builtin:0.3'`` -> its parts (weights normalised to sum to 1); ``'notes/'`` -> one
    part. Parts are separated by commas; a part's weight follows its last ``:``. Every part of a mix
    has a weight or none has; the same source twice is refused."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("--data is empty: give 'builtin', 'library', 'generated', a file, a directory, a glob, "
                          "or a mix such as 'notes/:0.7,builtin:0.3'")
    parts = []
    for raw in spec.split(","):
        raw = raw.strip()
        source, _, tail = raw.rpartition(":")
        weight = None
        if source and _is_number(tail):
            weight = float(tail)
            if not math.isfinite(weight) or weight <= 0:
                raise ConfigError(f"--data part {raw!r}: the weight {tail} must be a positive number")
        else:
            source = raw
        if not source:
            raise ConfigError(f"--data {spec!r} has an empty part; separate sources with single commas")
        parts.append(DataPart(source, weight))
    weighted = [p.weight is not None for p in parts]
    if any(weighted) and not all(weighted):
        bare = next(p.source for p in parts if p.weight is None)
        raise ConfigError(f"--data {spec!r}: give every part of a weighted mix a weight ({bare!r} has none, e.g. "
                          f"'{bare}:0.5')")
    seen = [p.source for p in parts]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"--data {spec!r} names {next(s for s in seen if seen.count(s) > 1)!r} twice; give each "
                          f"source once, with its weight")
    for p in parts:
        if p.source not in named and (p.source in NAMED_SOURCES or p.source == "mixed"):
            raise ConfigError(f"--data {p.source!r} is not a source here (use {', '.join(named)}, or files)")
    if all(weighted):
        total = sum(p.weight for p in parts)
        parts = [DataPart(p.source, p.weight / total) for p in parts]
    return tuple(parts)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def user_documents(source: str, tokenizer=None, field: str = "text") -> list[Document]:
    """The documents of a file, directory or glob (module docstring), as they are (their held-out
    split: :func:`document_sides`). ``tokenizer`` renders chat records (its chat template)."""
    files = data_files(source)
    docs = []
    for f, name in files:
        if f.suffix == ".jsonl":
            docs += _jsonl_documents(f, name, tokenizer, field)
        else:
            docs.append(Document(name, read_utf8(f)))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ConfigError(f"data {source!r} holds no text (its files are empty or whitespace only)")
    return docs


def data_files(source: str) -> list[tuple[Path, str]]:
    """``(path, document name)`` of every file ``source`` names, sorted."""
    path = Path(source)
    if any(c in source for c in "*?[") and not path.exists():
        matches = sorted(Path(m) for m in glob.glob(source, recursive=True))
        files = [(m, str(m)) for m in matches if m.is_file()]
        if not files:
            raise ConfigError(f"data {source!r} matches no files; check the pattern (quote it so the shell does "
                              f"not expand it)")
        return files
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"data directory {source!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return [(f, str(f.relative_to(path))) for f in files]
    if not path.is_file():
        raise ConfigError(f"data {source!r} not found: give a text file, a .jsonl file, a directory, a glob, or one "
                          f"of {', '.join(NAMED_SOURCES)}")
    return [(path, path.name)]


def _jsonl_documents(path: Path, name: str, tokenizer, field: str) -> list[Document]:
    docs = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not valid JSON ({e.msg}); each line must be {{\"{field}\": ...}} or "
                              f"{{\"messages\": [...]}}") from None
        if isinstance(record, dict) and field in record:
            text = record[field]
            if not isinstance(text, str):
                raise ConfigError(f"{where}: {field!r} holds a {type(text).__name__}, not text")
        elif isinstance(record, dict) and "messages" in record:
            text = _rendered_chat(record["messages"], tokenizer, where)
        else:
            raise ConfigError(f"{where} has neither a {field!r} nor a \"messages\" key; each line must be "
                              f"{{\"{field}\": \"...\"}} or {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")
        docs.append(Document(f"{name}:{n}", text))
    return docs


def _rendered_chat(messages, tokenizer, where: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., \"content\": ...}}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {m!r} needs a role in {list(_ROLES)} and a string content")
    refusal = (f"{where} is a chat record, and this model's tokenizer has no chat template to render it; give plain "
               f"{{\"text\": ...}} records instead")
    if tokenizer is None:
        raise ConfigError(refusal)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    except ConfigError:
        raise ConfigError(refusal) from None


def held_out(docs: list[Document], source: str = "data") -> list[Document]:
    """``docs`` with about :data:`VALIDATION_SHARE` of their text held out (module docstring): whole
    documents in the order of their names' hashes, none that would take the side past twice the share;
    if that leaves less than half the share (a few large documents), the largest training document's
    tail (from a line start) is held out as well. Both sides keep some text."""
    def key(d: Document) -> bytes:
        return hashlib.sha256(d.id.encode()).digest()

    total = sum(len(d.text) for d in docs)
    target = VALIDATION_SHARE * total
    held: set[int] = set()
    size = 0
    for i in sorted(range(len(docs)), key=lambda i: key(docs[i])):
        if size >= target or len(held) == len(docs) - 1:
            break
        if size + len(docs[i].text) <= 2 * target:
            held.add(i)
            size += len(docs[i].text)
    out = [Document(d.id, d.text, held_out=i in held) for i, d in enumerate(docs)]
    if size < target / 2:
        largest = max((i for i in range(len(docs)) if i not in held), key=lambda i: len(docs[i].text))
        out[largest:largest + 1] = _cut(docs[largest], int(target - size), source)
    return out


def _cut(doc: Document, chars: int, source: str) -> list[Document]:
    """One document as two: about its last ``chars`` characters (from a line start, else a word) held out."""
    text = doc.text
    at = len(text) - max(1, chars)
    line = text.rfind("\n", 0, at)
    cut = line + 1 if line > 0 else text.rfind(" ", 0, at) + 1
    if cut <= 0 or not text[:cut].strip() or not text[cut:].strip():
        raise ConfigError(f"data {source!r} is too little text to hold part of it out for validation; give more "
                          f"text (several lines)")
    return [Document(f"{doc.id}#train", text[:cut], held_out=False),
            Document(f"{doc.id}#validation", text[cut:], held_out=True)]


def read_documents(source: str, field: str = "text", tokenizer=None) -> list[Document]:
    """``builtin`` (validation split), ``builtin:train``, ``library`` / ``library:train`` (the larger
    corpus, train split by default), or the user's text (:func:`kvlab.data.sources.user_documents`: a file,
    a ``.jsonl`` file of ``{field: text}`` or chat ``{"messages": [...]}`` records, a directory, a glob),
    all of it or, with ``:train`` / ``:validation`` after it, one side of its held-out split."""
    if not source.strip():
        raise ConfigError("data '' is empty: give 'builtin', 'library', a text file, a .jsonl file, a directory "
                          "or a glob")
    if source == "builtin" or source.startswith("builtin:"):
        return builtin_corpus(source.partition(":")[2] or "validation")
    if source == "library" or source.startswith("library:"):
        return library_corpus(source.partition(":")[2] or "train")
    path, _, split = source.rpartition(":")
    if split in SPLITS and path:
        return document_sides(path, field, tokenizer)[split]
    return user_documents(source, tokenizer, field)


def document_sides(source: str, field: str = "text", tokenizer=None) -> dict[str, list[Document]]:
    """Both sides (``train``, ``validation``) of any source :func:`read_documents` reads, its files read
    once: the built-in or library corpus's own split, or the held-out split of the user's text."""
    if not source.strip():
        return {"train": read_documents(source)}          # its one line for empty data
    name = source.partition(":")[0]
    if name in ("builtin", "library"):
        return {split: read_documents(f"{name}:{split}") for split in SPLITS}
    docs = held_out(user_documents(source, tokenizer, field), source)
    return {split: [d for d in docs if d.split == split] for split in SPLITS}


def split_documents(source: str, split: str, field: str = "text", tokenizer=None) -> list[Document]:
    """One side (``train`` / ``validation``) of a source (:func:`document_sides`)."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {list(SPLITS)}")
    return document_sides(source, field, tokenizer)[split]

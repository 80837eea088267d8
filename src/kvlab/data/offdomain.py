"""Off-domain text: sets that kvlab assembles from text already shipped on the machine, none of it
Python or Python's documentation (the built-in and library corpora), so that a model shrunk on those
corpora — or on the user's own text — is also scored on kinds of text no stage of its run saw.

Sets (:data:`OFF_DOMAIN_SETS`), each read only if the machine has it:

- ``c-headers``: C headers of the system (``/usr/include``);
- ``man-pages``: English manual pages (``/usr/share/man/man1`` … ``man9``), the roff markup removed;
- ``javascript``: JavaScript shipped in packages (npm's ``node_modules``, ``/usr/share/javascript``,
  the ``.js`` files of installed Python packages), minified files left out;
- ``licenses``: licence and copyright texts (``/usr/share/common-licenses``, ``/usr/share/doc/*/copyright``):
  English legal prose.

A set is a sample, the same on every machine that ships the same files: files are taken in the order
of the sha256 of their path below the set's root (not the order of discovery), one passage of at most
:data:`PASSAGE_CHARS` characters from each (and from one file at most of those in a directory whose
names share their first word) — cut at line starts from the middle of the file, where a
licence header most source files open with is behind — until the set holds ``max_tokens`` tokens.
Files that are not UTF-8, or hold fewer than :data:`MIN_PASSAGE_CHARS` characters, are skipped.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kvlab.data.corpus import Document
from kvlab.errors import ConfigError

__all__ = ["OFF_DOMAIN_SETS", "OffDomainSet", "available_sets", "offdomain_documents", "roff_to_text"]

PASSAGE_CHARS = 2_000
MIN_PASSAGE_CHARS = 400
# Tokens per set by default: a few windows, enough for a ratio to two decimals, a few seconds per model.
DEFAULT_TOKENS = 4_096


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8")


def _read_man(path: Path) -> str:
    raw = path.read_bytes()
    return roff_to_text((gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8"))


_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "Nm", "Nd",
                     "Sh", "Ss", "Ar", "Fl", "Pa", "Em", "Xr", "Dv", "Ev", "Cm", "Op", "Li", "Sy"}
_ROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),
                 (re.compile(r"\\\(em|\\\[em\]"), "—"), (re.compile(r"\\\(en|\\\[en\]"), "–"),
                 (re.compile(r"\\\((aq|cq)"), "'"), (re.compile(r"\\\((lq|rq|dq)"), '"'),
                 (re.compile(r"\\\(bu"), "•"), (re.compile(r"\\\([a-zA-Z]{2}"), ""), (re.compile(r"\\[&|^%]"), ""),
                 (re.compile(r"\\s[-+]?\d"), ""), (re.compile(r"\\[-e]"), lambda m: "-" if m[0][1] == "-" else "\\"),
                 (re.compile(r"\\ "), " ")]


def roff_to_text(source: str) -> str:
    """A manual page's roff (man or mdoc macros) as plain text: comments and requests dropped, the text
    of the font and section macros kept, escapes resolved to the characters they print. Enough for
    scoring a language model on the page's words; not a typesetter."""
    out = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\#')) or line in (".", "'"):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', rest)]
            if macro == "IP" and words:          # .IP TAG INDENT: the tag is text, the indent is not
                words = words[:1]
            elif macro not in _ROFF_TEXT_MACROS:
                continue
            if not words:
                continue
            line = " ".join(words)
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


@dataclass(frozen=True)
class OffDomainSet:
    """One set: where its files are (roots, and glob patterns below each) and how a file becomes text."""

    name: str
    description: str
    roots: tuple[str, ...]
    patterns: tuple[str, ...]
    read: Callable[[Path], str] = _read_text
    skip: Callable[[Path], bool] = lambda path: False

    def files(self) -> list[tuple[str, Path]]:
        """(a key that names the file the same on every machine, its path), sorted by the key."""
        found = {}
        for root in self.roots:
            for pattern in self.patterns:
                for name in glob.glob(pattern, root_dir=root, recursive=True):
                    path = Path(root) / name
                    if path.is_file() and not self.skip(path):
                        found.setdefault(name, path)
        return sorted(found.items())


def _site_packages() -> tuple[str, ...]:
    return tuple(sorted({p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()}))


OFF_DOMAIN_SETS = {s.name: s for s in (
    OffDomainSet("c-headers", "C headers of the system (/usr/include)", ("/usr/include",), ("**/*.h",)),
    OffDomainSet("man-pages", "English manual pages (/usr/share/man/man1-9), roff markup removed", ("/usr/share/man",),
                 tuple(f"man{i}/*" for i in range(1, 10)), read=_read_man),
    OffDomainSet("javascript", "JavaScript shipped in packages (node_modules, /usr/share/javascript, Python packages)",
                 ("/usr/lib/node_modules", "/usr/local/lib/node_modules", "/usr/share/javascript", *_site_packages()),
                 ("**/*.js",), skip=lambda path: path.name.endswith((".min.js", "-min.js", ".bundle.js"))),
    OffDomainSet("licenses", "licence and copyright texts (/usr/share/common-licenses, /usr/share/doc/*/copyright)",
                 ("/usr/share/common-licenses", "/usr/share/doc"), ("*", "*/copyright")),
)}


def _passage(text: str) -> str:
    """At most PASSAGE_CHARS characters from the middle of ``text``, from a line start to a line end."""
    text = text.replace("\r\n", "\n").strip()
    if len(text) <= PASSAGE_CHARS:
        return text
    start = text.find("\n", (len(text) - PASSAGE_CHARS) // 2) + 1
    piece = text[start:start + PASSAGE_CHARS]
    end = piece.rfind("\n")
    return (piece[:end] if end > MIN_PASSAGE_CHARS else piece).strip()


def _group(key: str) -> tuple[str, str]:
    """Files of one group give one passage at most: a directory's files that share the first word of
    their names (one ``gcloud_*`` manual page per section, not hundreds)."""
    parent, _, name = key.rpartition("/")
    return parent, re.split(r"[-_.]", name, maxsplit=1)[0]


@cache
def _ordered_files(offdomain_set: OffDomainSet) -> tuple[tuple[str, str], ...]:
    files = offdomain_set.files()
    files.sort(key=lambda kv: hashlib.sha256(kv[0].encode()).digest())
    seen, out = set(), []
    for key, path in files:
        if _group(key) not in seen:
            seen.add(_group(key))
            out.append((key, str(path)))
    return tuple(out)


def available_sets() -> list[str]:
    """The sets this machine has at least one file of, in :data:`OFF_DOMAIN_SETS` order."""
    return [name for name, s in OFF_DOMAIN_SETS.items() if _ordered_files(s)]


def offdomain_documents(name: str | OffDomainSet, tokenizer=None, max_tokens: int = DEFAULT_TOKENS) -> list[Document]:
    """The passages of the set ``name`` (of :data:`OFF_DOMAIN_SETS`, or a set of one's own; module
    docstring): at least ``max_tokens`` tokens of them as ``tokenizer`` counts (without one, four
    characters to a token), or all the machine has."""
    if isinstance(name, str) and name not in OFF_DOMAIN_SETS:
        raise ConfigError(f"no off-domain set {name!r}; the sets are {', '.join(OFF_DOMAIN_SETS)}")
    offdomain_set = OFF_DOMAIN_SETS[name] if isinstance(name, str) else name
    docs, tokens = [], 0
    for key, path in _ordered_files(offdomain_set):
        try:
            text = _passage(offdomain_set.read(Path(path)))
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        if len(text) < MIN_PASSAGE_CHARS:
            continue
        docs.append(Document(f"{offdomain_set.name}/{key}", text, held_out=True))
        tokens += len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer is not None else len(text) // 4
        if tokens >= max_tokens:
            break
    return docs

"""The built-in corpora: the stdlib's documentation (``builtin``) and the larger ``library`` one
that adds the docstrings of kvlab's installed dependencies."""

import ast
import importlib.util

from kvlab.data.corpus import (
    LIBRARY_PACKAGES,
    _parsed_docstrings,
    builtin_corpus,
    builtin_documents,
    library_corpus,
    library_documents,
)
from kvlab.data.sources import read_documents


def test_the_split_is_a_function_of_the_document_id_alone():
    docs = builtin_documents()
    assert {d.id for d in builtin_corpus("train")} | {d.id for d in builtin_corpus("validation")} == {
        d.id for d in docs}
    assert not {d.id for d in builtin_corpus("train")} & {d.id for d in builtin_corpus("validation")}
    assert 0.05 < len(builtin_corpus("validation")) / len(docs) < 0.2


def test_the_library_corpus_is_many_times_larger_and_never_repeats_validation_text():
    builtin, library = builtin_documents(), library_documents()
    assert library[:len(builtin)] == builtin            # the built-in documents come first, unchanged
    size = lambda docs: sum(len(d.text) for d in docs)
    assert size(library_corpus("train")) > 8 * size(builtin_corpus("train"))
    assert {d.id.split("/")[0] for d in library[len(builtin):]} == {f"package:{p}" for p in LIBRARY_PACKAGES}
    assert read_documents("library") == library_corpus("train")
    assert read_documents("library:validation") == library_corpus("validation")


def test_a_docstring_the_builtin_corpus_already_has_is_not_repeated():
    # torch/utils/weak.py copies a docstring of the stdlib's weakref module (torch 2.13); the
    # library keeps the file's other docstrings and drops that one.
    path = importlib.util.find_spec("torch.utils.weak").origin
    parts = _parsed_docstrings(path)
    builtin_text = "\n\n".join(d.text for d in builtin_documents())
    copied = [p for p in parts if p in builtin_text]
    assert copied and len(copied) < len(parts)
    doc = next(d for d in library_documents() if d.id == "package:torch/utils/weak.py")
    assert doc.text == "\n\n".join(p for p in parts if p not in copied)


def test_a_package_document_is_its_files_docstrings_in_source_order():
    doc = next(d for d in library_documents() if d.id == "package:torch/nn/modules/linear.py")
    path = importlib.util.find_spec("torch.nn.modules.linear").origin
    tree = ast.parse(open(path, encoding="utf-8").read())
    first_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_"))
    assert ast.get_docstring(first_class, clean=True) in doc.text
    assert not [d for d in library_documents() if "/tests/" in d.id or "/test/" in d.id]

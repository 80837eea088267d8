"""Off-domain sets (kvlab.data.offdomain): which files a set takes and in what order, the passage cut
from each, roff to text; and the sets this machine ships are read and are not Python."""

import gzip
import hashlib

import pytest

from kvlab.data.offdomain import (
    MIN_PASSAGE_CHARS,
    OFF_DOMAIN_SETS,
    PASSAGE_CHARS,
    OffDomainSet,
    available_sets,
    offdomain_documents,
    roff_to_text,
)
from kvlab.errors import ConfigError


def _line(i: int) -> str:
    return f"line {i:04d} of a file that is long enough to be cut into a passage of whole lines"


def test_files_are_taken_in_hash_order_one_per_group_with_a_whole_line_passage_from_the_middle(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    texts = {}
    for name in ("alpha.h", "beta.h", "gamma_one.h", "gamma_two.h", "sub/delta.h"):
        texts[name] = "\n".join(_line(i) for i in range(200)) if name == "beta.h" else f"{name} " + "word " * 120
        (root / name).write_text(texts[name])
    (root / "latin1.h").write_bytes("caf\xe9 ".encode("latin-1") * 200)       # not UTF-8: skipped
    (root / "short.h").write_text("too short")                                 # under MIN_PASSAGE_CHARS: skipped
    test_set = OffDomainSet("test", "test files", (str(root),), ("**/*.h",))
    docs = offdomain_documents(test_set, max_tokens=10**9)
    # gamma_one and gamma_two share a directory and a first word: the first in hash order stands for both
    keys = ["alpha.h", "beta.h", "latin1.h", "short.h", "sub/delta.h",
            min(("gamma_one.h", "gamma_two.h"), key=lambda k: hashlib.sha256(k.encode()).digest())]
    expected = [k for k in sorted(keys, key=lambda k: hashlib.sha256(k.encode()).digest())
                if k not in ("latin1.h", "short.h")]
    assert [d.id for d in docs] == [f"test/{k}" for k in expected]
    assert all(d.held_out for d in docs)
    beta = next(d.text for d in docs if d.id == "test/beta.h")
    assert MIN_PASSAGE_CHARS < len(beta) <= PASSAGE_CHARS and beta in texts["beta.h"]
    lines = beta.split("\n")
    assert all(ln in texts["beta.h"].split("\n") for ln in lines)          # whole lines only
    first = int(lines[0].split()[1])
    assert 50 < first < 150                                                  # from the middle, not the head
    # a token budget stops the sample early: four characters to a token without a tokenizer
    assert len(offdomain_documents(test_set, max_tokens=1)) == 1


def test_roff_is_read_as_the_text_it_prints():
    page = gzip.compress(b"".join(s.encode() + b"\n" for s in [
        '.\\" a comment', ".TH LS 1", ".SH NAME", "ls \\- list directory contents", ".SH DESCRIPTION",
        ".B ls", "lists \\fIfiles\\fR \\(em one per line\\&.", ".TP 8", ".BR \\-a \", --all\"", ".PP",
        ".IP \\(bu 2", "do not ignore entries starting with \\e."]))
    text = roff_to_text(gzip.decompress(page).decode())
    assert text.split("\n") == ["NAME", "ls - list directory contents", "DESCRIPTION", "ls",
                                "lists files — one per line.", "-a , --all", "•",
                                "do not ignore entries starting with \\."]


def test_the_machines_sets_are_read_and_none_of_them_is_python():
    names = available_sets()
    if not names:
        pytest.skip("this machine ships none of the off-domain files")
    for name in names:
        docs = offdomain_documents(name, max_tokens=2000)
        assert docs
        assert not any(d.id.endswith((".py", ".pyi")) for d in docs)
        assert all(d.id.startswith(f"{name}/") and len(d.text) >= MIN_PASSAGE_CHARS for d in docs)
        assert offdomain_documents(name, max_tokens=2000) == docs                # the same sample every time
    with pytest.raises(ConfigError, match="no off-domain set 'python'"):
        offdomain_documents("python")
    assert set(OFF_DOMAIN_SETS) == {"c-headers", "man-pages", "javascript", "licenses"}

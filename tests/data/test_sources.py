"""The user's own text (kvlab.data.sources): files, directories, globs, JSONL of text or chat records,
held-out splits and weighted mixes (kvlab.data.windows.MixedWindows)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from kvlab.data.corpus import Document, builtin_corpus
from kvlab.data.sources import DataPart, held_out, parse_data, read_documents, split_documents, user_documents
from kvlab.data.windows import MixedWindows, TokenMix, calibration_batches
from kvlab.errors import ConfigError
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.recipes.pretrain import training_tokens

CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_mix_is_parsed_into_weighted_parts():
    assert parse_data("notes/") == (DataPart("notes/", None),)
    assert parse_data("a.jsonl:0.7,builtin:0.3") == (DataPart("a.jsonl", 0.7), DataPart("builtin", 0.3))
    assert parse_data("a.txt:3, b/:1") == (DataPart("a.txt", 0.75), DataPart("b/", 0.25))
    assert parse_data("builtin,generated") == (DataPart("builtin"), DataPart("generated"))
    assert parse_data("c:/x.txt") == (DataPart("c:/x.txt"),)      # a ':' not followed by a number is the path's
    for bad, needle in (("a.txt:0.5,builtin", "'builtin' has none"), ("a.txt:0,b:1", "positive"),
                        ("a.txt:-1,b:1", "positive"), ("a:inf,b:1", "positive"), ("a,,b", "empty part"),
                        ("builtin,builtin", "twice"), ("  ", "empty"), ("mixed,builtin", "not a source")):
        with pytest.raises(ConfigError, match=needle):
            parse_data(bad)


def test_directories_globs_and_jsonl_of_text_or_chat_become_documents(tmp_path):
    _write(tmp_path / "d" / "a.txt", "alpha text")
    _write(tmp_path / "d" / "sub" / "b.md", "beta notes")
    _write(tmp_path / "d" / "skip.bin", "not read in a directory")
    _write(tmp_path / "d" / "c.jsonl", json.dumps({"text": "gamma"}) + "\n\n" + json.dumps(CHAT) + "\n")
    tok = ByteTokenizer()
    docs = user_documents(str(tmp_path / "d"), tok)
    assert [d.id for d in docs] == ["a.txt", "c.jsonl:1", "c.jsonl:3", "sub/b.md"]
    # A chat record is the conversation as the model's chat template renders it (ByteTokenizer's own
    # format: "<|role|>\n" + content, turns apart by newlines; text drops the EOS id).
    assert docs[2].text == "<|user|>\n2+2?\n<|assistant|>\n4"
    assert [d.text for d in docs[:2]] + [docs[3].text] == ["alpha text", "gamma", "beta notes"]
    globbed = user_documents(str(tmp_path / "d" / "**" / "*.md"))
    assert [d.id for d in globbed] == [str(tmp_path / "d" / "sub" / "b.md")]
    assert [d.text for d in read_documents(str(tmp_path / "d" / "a.txt"))] == ["alpha text"]


@pytest.mark.parametrize("content, needle", [
    ("{oops}\n", "c.jsonl:1 is not valid JSON"),
    (json.dumps({"body": "x"}) + "\n", "neither a 'text' nor a \"messages\" key"),
    (json.dumps({"text": 3}) + "\n", "holds a int, not text"),
    (json.dumps({"messages": []}) + "\n", "non-empty list"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n", "wizard"),
])
def test_bad_jsonl_is_one_line_naming_the_line(tmp_path, content, needle):
    _write(tmp_path / "c.jsonl", content)
    with pytest.raises(ConfigError, match=needle):
        user_documents(str(tmp_path / "c.jsonl"), ByteTokenizer())


def test_a_chat_record_needs_a_chat_template(tmp_path):
    _write(tmp_path / "c.jsonl", json.dumps(CHAT) + "\n")
    with pytest.raises(ConfigError, match="no chat template"):
        user_documents(str(tmp_path / "c.jsonl"), None)


def test_held_out_splits_hold_a_tenth_of_the_text_and_lose_none(tmp_path):
    def order(docs):
        return sorted(docs, key=lambda d: hashlib.sha256(d.id.encode()).digest())

    docs = [Document(f"doc{i}", f"text number {i:02d}") for i in range(60)]        # 14 characters each
    split = held_out(docs)
    val = [d.id for d in split if d.split == "validation"]
    assert set(val) == {d.id for d in order(docs)[:6]}                # 6 × 14 = a tenth of 840, in hash order
    assert [d.text for d in split] == [d.text for d in docs]                            # nothing lost or moved
    # A few uneven documents: the large one would hold out most of the text, so its tail is held out.
    uneven = [Document("big", "".join(f"row {i:03d}\n" for i in range(200))), Document("small", "tiny note")]
    split = held_out(uneven)
    held = "".join(d.text for d in split if d.split == "validation")
    assert 0.05 <= len(held) / sum(len(d.text) for d in uneven) <= 0.2
    assert "".join(d.text for d in split if d.id.startswith("big")) == uneven[0].text
    # One document: its last tenth, from a line start, is held out; nothing is lost.
    text = "".join(f"line {i:03d} of the only file\n" for i in range(100))
    _write(tmp_path / "one.txt", text)
    train, val = (split_documents(str(tmp_path / "one.txt"), s) for s in ("train", "validation"))
    assert train[0].text + val[0].text == text
    assert val[0].text.startswith("line 090") and len(val[0].text) == pytest.approx(0.1 * len(text), rel=0.05)
    assert read_documents(f"{tmp_path / 'one.txt'}:validation") == val
    with pytest.raises(ConfigError, match="too little text"):
        held_out([Document("x", "word")])


def test_training_reads_the_train_side_and_scores_the_held_out_side(tmp_path):
    text = "".join(f"sentence number {i}.\n" for i in range(200))
    _write(tmp_path / "notes.txt", text)
    train, val = training_tokens(ByteTokenizer(), str(tmp_path / "notes.txt"))
    tok = ByteTokenizer()
    cut = split_documents(str(tmp_path / "notes.txt"), "validation")[0].text
    assert val is not None and list(val) == [*cut.encode(), tok.eos_token_id]      # each document ends in EOS
    assert train.n_tokens + len(val) == len(text) + 2
    # A weighted mix trains on each part's train side and validates on every part's held-out side.
    mix, mixed_val = training_tokens(tok, f"{tmp_path / 'notes.txt'}:0.5,builtin:0.5")
    assert [(name, weight) for name, _, weight in mix.parts] == [(str(tmp_path / "notes.txt"), 0.5), ("builtin", 0.5)]
    assert list(mix.parts[0][1]) == list(train.parts[0][1])
    builtin_val = sum(len(d.text.encode()) + 1 for d in builtin_corpus("validation"))
    assert len(mixed_val) == len(val) + builtin_val
    assert isinstance(mix.windows(64, 4), MixedWindows)
    with pytest.raises(ConfigError, match="draws its windows at random"):
        mix.windows(64, 4, mode="sequential")
    with pytest.raises(ConfigError, match="'generated' is not a source here"):
        training_tokens(tok, "generated")


def test_a_weighted_mix_draws_windows_in_its_shares():
    a, b = np.zeros(5000, dtype=np.int64), np.ones(300, dtype=np.int64)      # a large and a small stream
    windows = MixedWindows([a, b], [0.25, 0.75], seq_len=16, batch_size=64, seed=1)
    rows = np.concatenate([windows.batch(i)[0][:, 0].numpy() for i in range(40)])
    share = rows.mean()                                    # rows from the small stream (ones)
    # 2,560 rows at p = 0.75: a standard deviation of 0.0086; 5 of them.
    assert abs(share - 0.75) < 0.043
    again = MixedWindows([a, b], [0.25, 0.75], seq_len=16, batch_size=64, seed=1)
    assert all((windows.batch(i)[0] == again.batch(i)[0]).all() for i in range(3))        # a pure function of i
    halves = [MixedWindows([a, b], [1, 3], seq_len=16, batch_size=64, seed=1, rank=r, world_size=2).batch(5)[0]
              for r in (0, 1)]
    assert (np.concatenate(halves) == windows.batch(5)[0].numpy()).all()                   # ranks split the rows
    with pytest.raises(ConfigError, match="tiny has 10 tokens"):
        MixedWindows([a, np.ones(10)], [1, 1], seq_len=16, batch_size=4, names=["big", "tiny"])


def test_calibration_reads_a_mix_and_an_unweighted_one_is_its_texts_in_order():
    a, b = np.arange(0, 100), np.arange(1000, 1100)
    plain = TokenMix([("a", a, None), ("b", b, None)])
    assert plain.n_tokens == plain.shortest == 200
    rows = calibration_batches(None, 64, seq_len=32, batch_size=1, text=plain)
    flat = np.concatenate([r.numpy().ravel() for r in rows])
    assert set(flat) <= set(a) | set(b) and len(flat) == 64
    mixed = TokenMix([("a", a, 0.5), ("b", b, 0.5)])
    assert mixed.weighted and mixed.shortest == 100
    assert isinstance(mixed.windows(16, 4), MixedWindows)

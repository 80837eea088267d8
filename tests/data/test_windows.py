import numpy as np
import pytest

from kvlab import ConfigError
from kvlab.data.corpus import Document
from kvlab.data.windows import Windows, token_dtype, tokenize_to_file
from kvlab.io.tokenizer import ByteTokenizer

DOCS = [Document("a", "hello"), Document("b", "kv"), Document("c", "cache!")]


def test_documents_are_separated_by_eos(tmp_path):
    tok = ByteTokenizer()
    f = tokenize_to_file(DOCS, tok, cache_dir=tmp_path, progress=False)
    expected = [*b"hello", 257, *b"kv", 257, *b"cache!", 257]
    assert f.tokens.tolist() == expected and f.n_documents == 3
    assert f.tokens.dtype == np.uint16


def test_dtype_choice():
    assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_cache_reused_and_invalidated_when_input_changes(tmp_path):
    tok = ByteTokenizer()
    first = tokenize_to_file(DOCS, tok, cache_dir=tmp_path, progress=False)
    again = tokenize_to_file(DOCS, tok, cache_dir=tmp_path, progress=False)
    assert again.path == first.path
    changed = tokenize_to_file([*DOCS[:2], Document("c", "cache?")], tok, cache_dir=tmp_path, progress=False)
    assert changed.path != first.path and changed.tokens[-2] == ord("?")
    # No temporary files are left behind.
    assert not [p for p in (tmp_path / "tokens").iterdir() if p.name.startswith(".")]


def test_windows_random_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    w = Windows(tokens, seq_len=16, batch_size=4, seed=3)
    x, y = w.batch(7)
    assert x.shape == (4, 16) and (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    assert (Windows(tokens, 16, 4, seed=3).batch(7)[0] == x).all()
    assert not (Windows(tokens, 16, 4, seed=4).batch(7)[0] == x).all()


def test_windows_sequential_cover_the_corpus_and_shard_by_rank():
    tokens = np.arange(100, dtype=np.uint16)
    w = Windows(tokens, seq_len=10, batch_size=3, mode="sequential")
    starts = [int(w.batch(i)[0][r, 0]) for i in range(3) for r in range(3)]
    assert starts == [0, 10, 20, 30, 40, 50, 60, 70, 80]
    full = w.batch(1)[0]
    halves = [Windows(tokens, 10, 4, mode="sequential", rank=r, world_size=2).batch(0)[0] for r in (0, 1)]
    assert [int(h[i, 0]) for h in halves for i in range(2)] == [0, 10, 20, 30]
    assert full.shape == (3, 10)


def test_window_errors():
    with pytest.raises(ConfigError, match="fewer than one window"):
        Windows(np.arange(10, dtype=np.uint16), seq_len=16, batch_size=2)
    with pytest.raises(ConfigError, match="not divisible by world_size=3"):
        Windows(np.arange(100, dtype=np.uint16), seq_len=8, batch_size=4, world_size=3)

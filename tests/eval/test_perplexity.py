import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab import ConfigError
from kvlab.data.corpus import Document, builtin_corpus, builtin_documents, corpus_fingerprint
from kvlab.data.sources import read_documents
from kvlab.eval.perplexity import evaluate, windows
from kvlab.io.tokenizer import ByteTokenizer

from conftest import make_model


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 60), seq_len=st.integers(1, 20), stride_frac=st.floats(0.05, 1.0))
def test_windows_score_every_token_once_with_bounded_inputs(n, seq_len, stride_frac):
    ids = list(range(1000, 1000 + n))
    stride = max(1, min(seq_len, int(seq_len * stride_frac)))
    scored = []
    for w in windows(ids, seq_len, stride):
        assert 1 <= len(w.tokens) <= seq_len and len(w.targets) == len(w.tokens)
        for i, t in enumerate(w.targets):
            if t != -100:
                assert t == ids[ids.index(w.tokens[i]) + 1]   # a target is the next token of its input
                scored.append(t)
    assert scored == ids[1:]


def test_evaluate_equals_manual_nll():
    model = make_model()
    tok = ByteTokenizer()
    docs = [Document("a", "hello world"), Document("b", "kv caches are small")]
    result = evaluate(model, tok, docs, seq_len=64, progress=False)
    nll, n = 0.0, 0
    for d in docs:
        ids = torch.tensor([[tok.bos_token_id, *d.text.encode()]])
        logits = model(ids)[0, :-1].double()
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    assert result.tokens == n == len("hello world") + len("kv caches are small")
    assert math.isclose(result.perplexity, math.exp(nll / n), rel_tol=1e-5)
    assert math.isclose(result.bits_per_byte, nll / math.log(2) / n, rel_tol=1e-5)   # bytes = tokens here
    # Windowed scoring of the same text (seq_len 8) sums to a different but finite NLL over the same tokens.
    windowed = evaluate(model, tok, docs, seq_len=8, stride=4, progress=False)
    assert windowed.tokens == n and math.isfinite(windowed.perplexity)


def test_max_tokens_cuts_the_corpus():
    model = make_model()
    docs = [Document("a", "x" * 50), Document("b", "y" * 50)]
    r = evaluate(model, ByteTokenizer(), docs, seq_len=16, max_tokens=70, progress=False)
    assert (r.tokens, r.bytes, r.documents) == (70, 70, 2)


def test_builtin_corpus_split_is_deterministic_and_disjoint():
    train, val = builtin_corpus("train"), builtin_corpus("validation")
    ids_t, ids_v = {d.id for d in train}, {d.id for d in val}
    assert ids_t.isdisjoint(ids_v) and len(ids_t | ids_v) == len(builtin_documents())
    assert 0.05 < len(val) / (len(val) + len(train)) < 0.2
    assert sum(len(d.text) for d in train) > 500_000
    assert any(d.id.startswith("topic:") for d in train) and any(d.id.startswith("module:") for d in train)
    builtin_documents.cache_clear()
    assert corpus_fingerprint(builtin_corpus("validation")) == corpus_fingerprint(val)


def test_read_documents_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("one")
    (tmp_path / "d" / "y.txt").write_text("two")
    (tmp_path / "c.jsonl").write_text('{"text": "first"}\n\n{"text": "second"}\n')
    assert [d.text for d in read_documents(str(tmp_path / "a.txt"))] == ["alpha"]
    assert [d.text for d in read_documents(str(tmp_path / "d"))] == ["one", "two"]
    assert [d.text for d in read_documents(str(tmp_path / "c.jsonl"))] == ["first", "second"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1 has neither a 'text' nor a \"messages\" key"):
        read_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="not found"):
        read_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="split='test'"):
        read_documents("builtin:test")


def test_evaluate_errors():
    model = make_model()
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        evaluate(model, None, [Document("a", "x")])
    with pytest.raises(ConfigError, match="stride=9 must be in"):
        evaluate(model, ByteTokenizer(), [Document("a", "x")], seq_len=8, stride=9)


def test_smollm2_perplexity_matches_transformers(smollm2, hf_smollm2):
    """Same tokens, documents shorter than the window: transformers' NLL is the reference."""
    hf, _ = hf_smollm2
    docs = builtin_corpus("validation")[:3]
    docs = [Document(d.id, d.text[:1500]) for d in docs]
    ours = evaluate(smollm2, smollm2.tokenizer, docs, seq_len=2048, progress=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([[smollm2.tokenizer.bos_token_id,
                                 *smollm2.tokenizer.encode(d.text, add_special_tokens=False)]])
            logits = hf(ids).logits[0, :-1].double()
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    assert ours.tokens == n
    assert abs(ours.perplexity / math.exp(nll / n) - 1) < 0.005

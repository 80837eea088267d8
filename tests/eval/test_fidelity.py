"""Fidelity to the original (kvlab.eval.fidelity): perplexity ratio, KL(original ‖ model) and top-1
agreement, against a float64 computation written out here."""

import math

import pytest
import torch

from kvlab.data.corpus import Document
from kvlab.errors import ConfigError
from kvlab.eval.fidelity import compare, fidelity
from kvlab.eval.perplexity import evaluate
from kvlab.io.tokenizer import ByteTokenizer

from conftest import make_model

DOCS = [Document("a", "the river rose and the ferry ran twice."), Document("b", "int main(void) { return 0; }"),
        Document("c", "x" * 3)]


def _perturbed(seed: int = 0, noise: float = 0.3):
    """The seed-0 model with every weight moved by a little noise: close to it, not equal."""
    model = make_model(seed=0, vocab_size=259)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g) if p.numel() > 1 else 0)
    return model


def _reference(original, model, tok, docs):
    """Each document in one window (its BOS first): the sums over every predicted token, in float64."""
    nll_p = nll_q = kl = 0.0
    agree = n = 0
    for d in docs:
        ids = torch.tensor([[tok.bos_token_id, *tok.encode(d.text, add_special_tokens=False)]])
        with torch.no_grad():
            p = torch.log_softmax(original.double()(ids[:, :-1])[0].double(), -1)
            q = torch.log_softmax(model.double()(ids[:, :-1])[0].double(), -1)
        target = ids[0, 1:]
        for t in range(len(target)):
            nll_p -= float(p[t, target[t]])
            nll_q -= float(q[t, target[t]])
            kl += float(sum(math.exp(a) * (a - b) for a, b in zip(p[t].tolist(), q[t].tolist())))
            agree += int(p[t].argmax() == q[t].argmax())
            n += 1
    return math.exp(nll_q / n), math.exp(nll_p / n), kl / n, agree / n, n


def test_fidelity_equals_a_float64_computation_and_a_model_against_itself_is_exact():
    tok = ByteTokenizer()
    original, model = make_model(seed=0, vocab_size=259), _perturbed()
    got = fidelity(original, model, tok, DOCS, seq_len=64, batch_size=2)
    ppl, ppl_original, kl, agree, n = _reference(make_model(seed=0, vocab_size=259), _perturbed(), tok, DOCS)
    assert got.tokens == n
    assert got.perplexity == pytest.approx(ppl, rel=1e-4) and got.original_perplexity == pytest.approx(ppl_original,
                                                                                                        rel=1e-4)
    assert got.perplexity_ratio == pytest.approx(ppl / ppl_original, rel=1e-4)
    assert got.kl == pytest.approx(kl, rel=1e-3) and kl > 1e-3
    assert got.top1_agreement == pytest.approx(agree, abs=1e-9) and 0 < agree < 1
    # The perplexities are evaluate's (the same windows), and compare gives evaluate's whole result.
    assert got.perplexity == pytest.approx(evaluate(model, tok, DOCS, seq_len=64, progress=False).perplexity, rel=1e-6)
    result, _ = compare(original, model, tok, DOCS, seq_len=64, batch_size=2)
    assert result.to_dict() == pytest.approx(evaluate(model, tok, DOCS, seq_len=64, progress=False).to_dict(),
                                             rel=1e-6)
    same = fidelity(original, original, tok, DOCS, seq_len=64)
    assert same.kl == pytest.approx(0, abs=1e-6) and same.top1_agreement == 1 and same.perplexity_ratio == 1


def test_each_model_reads_through_its_own_cache():
    tok = ByteTokenizer()
    original = make_model(seed=0, vocab_size=259)
    rounded = fidelity(original, original, tok, DOCS, seq_len=64, kv_quant="int4")
    assert rounded.kl > 1e-7 and rounded.top1_agreement < 1 and rounded.perplexity != rounded.original_perplexity
    assert rounded.perplexity == pytest.approx(evaluate(original, tok, DOCS, seq_len=64, kv_quant="int4",
                                                        progress=False).perplexity, rel=1e-6)
    with pytest.raises(ConfigError, match="vocabularies differ"):
        fidelity(original, make_model(seed=0, vocab_size=300), tok, DOCS)


def test_several_models_against_one_pass_of_the_original_equal_each_compared_alone():
    from kvlab.eval.fidelity import compare_each

    tok = ByteTokenizer()
    original, model = make_model(seed=0, vocab_size=259), _perturbed()
    together = compare_each(original, [(model, "int4"), (model, None)], tok, DOCS, seq_len=16, batch_size=2)
    for (result, fid), kv_quant in zip(together, ("int4", None)):
        alone_result, alone_fid = compare(original, model, tok, DOCS, seq_len=16, batch_size=2, kv_quant=kv_quant)
        assert result.to_dict() == pytest.approx(alone_result.to_dict(), rel=1e-6)
        assert fid.to_dict() == pytest.approx(alone_fid.to_dict(), rel=1e-6)
    assert together[0][1].kl != together[1][1].kl

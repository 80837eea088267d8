"""The next-line and recall tasks (kvlab.eval.cloze): what the items are, and their scores against a
float64 computation written out here (each item on its own, no batching or padding)."""

import re

import pytest
import torch

from kvlab.data.corpus import Document
from kvlab.errors import ConfigError
from kvlab.eval.cloze import continuation_logprobs, next_line_accuracy, next_line_items, recall_accuracy, recall_items
from kvlab.io.tokenizer import ByteTokenizer

from conftest import make_model

TOK = ByteTokenizer()
DOCS = [Document(f"doc{k}", "\n".join(f"{'    ' * (i % 3)}entry_{k}_{i} = value_{k}_{i} + offset_{k}"
                                      for i in range(12)) + f"\nreturn offset_{k} and entry_{k}_3 and value_{k}_3\n")
        for k in range(4)]


def test_next_line_items_hold_the_true_line_among_lines_of_other_documents():
    items = next_line_items(DOCS, 12, seed=1)
    assert len(items) == 12 and len({it.source for it in items}) == 4       # documents taken in turn
    for it in items:
        lines = next(d for d in DOCS if d.id == it.source).text.split("\n")
        gold = it.choices[it.answer]
        assert len(it.choices) == 4 and len(set(it.choices)) == 4
        i = lines.index(gold)
        assert it.context.endswith("\n") and "\n".join(lines[:i]).endswith(it.context[:-1])
        for k, choice in enumerate(it.choices):
            if k != it.answer:
                assert choice not in lines and 0.7 * len(gold) <= len(choice) <= 1.3 * len(gold)
    assert next_line_items(DOCS, 12, seed=1) == items and next_line_items(DOCS, 12, seed=2) != items


def test_recall_items_ask_for_an_identifier_the_passage_used_before():
    items = recall_items(DOCS, 10, seed=0)
    assert len(items) == 10
    for it in items:
        word = it.choices[0]
        text = next(d for d in DOCS if d.id == it.source).text
        assert re.fullmatch(r"[A-Za-z_]\w{4,}", word) and word in it.context
        cut = text.index(it.context) + len(it.context)
        assert text[cut:cut + len(word)] == word and not (text[cut + len(word):cut + len(word) + 1].isalnum())


def _row_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model.double()(torch.tensor([ids]))[0].double(), -1)


def test_scores_equal_a_float64_computation_item_by_item():
    model = make_model(seed=0, vocab_size=259)
    items = next_line_items(DOCS, 12, seed=1)
    hits = hits_norm = 0
    for it in items:
        ctx = TOK.encode(it.context, add_special_tokens=False)
        lls = []
        for choice in it.choices:
            cont = TOK.encode(choice, add_special_tokens=False)
            logp = _row_logprobs(model, [TOK.bos_token_id, *ctx, *cont])
            lls.append(sum(float(logp[len(ctx) + j, cont[j]]) for j in range(len(cont))))
        hits += max(range(4), key=lambda k: lls[k]) == it.answer
        hits_norm += max(range(4), key=lambda k: lls[k] / len(it.choices[k].encode())) == it.answer
    got = next_line_accuracy(make_model(seed=0, vocab_size=259), TOK, items, batch_size=5)
    assert (got.accuracy, got.accuracy_norm, got.n) == (hits / len(items), hits_norm / len(items), len(items))

    recall = recall_items(DOCS, 10, seed=0)
    hits = 0
    for it in recall:
        ctx = TOK.encode(it.context, add_special_tokens=False)
        word = TOK.encode(it.choices[0], add_special_tokens=False)
        best = _row_logprobs(model, [TOK.bos_token_id, *ctx, *word]).argmax(-1)[len(ctx):].tolist()
        after = TOK.decode([best[-1]])
        hits += best[:-1] == word and not (after[:1].isalnum() or after[:1] == "_")
    got = recall_accuracy(make_model(seed=0, vocab_size=259), TOK, recall, batch_size=3)
    assert got.accuracy == hits / len(recall) and got.accuracy_norm is None


def test_a_model_that_knows_the_text_scores_and_a_quantized_cache_is_read(tmp_path):
    """The task is passable: a model trained on these passages picks their lines; and the scores read
    the model through its cache format (an int4 cache changes the log-likelihoods)."""
    from kvlab.data.windows import Windows, tokenize_to_file
    from kvlab.training import TrainConfig, train

    # four documents, each written in its own letter: a trained model continues a passage in its letter
    docs = [Document(f"letters{k}", "\n".join(" ".join(chr(97 + k) * ((i * j) % 5 + 2) for j in range(1, 6)) + f" {i}"
                                              for i in range(14))) for k in range(4)]
    model = make_model(seed=0, vocab_size=259)
    tokens = tokenize_to_file(docs * 8, TOK, progress=False).tokens
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=120, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5,
                      eval_every=10**9, save_every=10**9, log_every=10**9)
    train(model, Windows(tokens, 64, 8, seed=0), None, cfg, quiet=True)
    items = next_line_items(docs, 12, seed=1)
    assert len(items) == 12 and next_line_accuracy(model, TOK, items).accuracy >= 0.75
    rows = [([TOK.bos_token_id, *TOK.encode("entry_1_4 = value", add_special_tokens=False)], 5, [0])]
    (_, float_cache), = continuation_logprobs(model, rows, 1, None, None)
    (_, int4_cache), = continuation_logprobs(model, rows, 1, "int4", None)
    assert not torch.allclose(float_cache, int4_cache, atol=1e-4)
    with pytest.raises(ConfigError, match="no next-line items"):
        next_line_accuracy(model, TOK, [])

"""The trust suite (kvlab.eval.suite) and kvlab eval's off-domain, passkey and task options: a model against
itself is exact, its quantized cache is not, and each part is what its own module computes."""

import json

import pytest

import kvlab
from kvlab.cli import main
from kvlab.data.offdomain import available_sets, offdomain_documents
from kvlab.eval.cloze import next_line_accuracy
from kvlab.eval.fidelity import fidelity
from kvlab.eval.passkey import passkey_retrieval
from kvlab.eval.suite import build_suite, suite_summary

needs_text = pytest.mark.skipif(not available_sets(), reason="this machine ships none of the off-domain files")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A byte-level tiny model with a context long enough for a passkey prompt (its bytes), saved."""
    from kvlab import ModelConfig
    from kvlab.io import save_checkpoint
    from kvlab.recipes.pretrain import new_byte_level_model

    path = tmp_path_factory.mktemp("suite") / "model"
    save_checkpoint(new_byte_level_model(ModelConfig.from_preset("tiny", max_seq_len=1024)), path)
    return path


@needs_text
def test_the_suite_scores_each_part_as_its_module_does(small):
    model = kvlab.load(small)
    tok = model.tokenizer
    suite = build_suite(tok, model.cfg.max_seq_len, domain_tokens=96, passkey_lengths=(400, 10**6), task_items=6,
                        seq_len=64)
    assert {t.length for t in suite.passkey} == {400}          # lengths past the model's context left out
    assert set(suite.domains) == set(available_sets()) and all(len(v) == 6 for v in suite.tasks.values())
    same = suite.score(model, tok, original=model)
    assert all(d["kl"] == pytest.approx(0, abs=1e-6) and d["top1_agreement"] == 1 for d in same["domains"].values())
    rounded = suite.score(model, tok, original=model, kv_quant="int4")
    name = next(iter(suite.domains))
    want = fidelity(model, model, tok, suite.domains[name], seq_len=64, max_tokens=96, kv_quant="int4")
    assert rounded["domains"][name] == pytest.approx(want.to_dict())
    assert rounded["domains"][name]["kl"] > 0 and want.tokens == 96
    assert rounded["passkey"] == passkey_retrieval(model, suite.passkey, kv_quant="int4").to_dict()
    assert rounded["tasks"]["next-line"] == next_line_accuracy(model, tok, suite.tasks["next-line"],
                                                               kv_quant="int4").to_dict()
    alone = suite.score(model, tok)                # no original: each set's perplexity
    assert alone["domains"][name]["tokens"] == 96 and alone["domains"][name]["perplexity"] > 1
    line = suite_summary(rounded, same)
    assert "off-domain perplexity ratio" in line and "passkey" in line and "(original" in line


@needs_text
def test_kvlab_eval_scores_off_domain_sets_passkey_and_tasks_beside_the_original(small, capsys):
    code = main(["eval", str(small), "--original", str(small), "--data", "offdomain", "--max-tokens", "64",
                 "--seq-len", "64", "--passkey", "--passkey-lengths", "400", "--passkey-trials", "1", "--tasks",
                 "next-line,recall", "--task-items", "4", "--kv-quant", "int8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and set(out["suite"]["domains"]) == set(available_sets())
    assert all(d["tokens"] == 64 for d in out["suite"]["domains"].values())
    assert out["suite"]["passkey"]["trials"] == 5 and out["original_suite"]["passkey"]["trials"] == 5
    assert set(out["suite"]["tasks"]) == {"next-line", "recall"} and "domains" not in out["original_suite"]
    assert "perplexity" not in out                      # --data offdomain: the sets only
    docs = offdomain_documents(next(iter(out["suite"]["domains"])), kvlab.load(small).tokenizer, 64)
    assert docs                                         # the same sample the command scored


def test_kvlab_eval_refuses_a_passkey_past_the_models_context_in_one_line(small, capsys):
    code = main(["eval", str(small), "--passkey", "--passkey-lengths", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and "--passkey-lengths 100000" in err and len(err.strip().splitlines()) == 1

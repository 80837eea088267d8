"""kvlab models in lm-evaluation-harness (kvlab.eval.harness), offline on tasks defined from local files:
log-likelihoods against a float64 computation, generation cut at the task's stop strings, rolling
log-likelihoods against kvlab's own perplexity, and lm-eval's accuracy against the choices scored here."""

import json
import math

import pytest
import torch

import kvlab
from kvlab.cli import main
from kvlab.data.corpus import Document
from kvlab.eval.perplexity import evaluate

lm_eval = pytest.importorskip("lm_eval")
from kvlab.eval.harness import KvlabLM, run_tasks  # noqa: E402

MC = [{"question": "the river rose and the", "choices": [" ferry ran", " zqx vvk", " river"], "label": 0},
      {"question": "int main(void) {", "choices": [" return 0; }", " the ferry", " ))))"], "label": 0},
      {"question": "one two three", "choices": [" four", " 4", " seven"], "label": 0}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tasks(tmp_path):
    """A multiple-choice task and a generation task over local JSONL files (their cache in tmp_path)."""
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n"
                                                for q in ("the river", "int main", "one two")))
    data = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / name}\n"
                         f"  cache_dir: {tmp_path / 'cache'}\ntest_split: test\nmetadata: {{version: 1.0}}\n")
    (tmp_path / "kv_mc.yaml").write_text(
        "task: kv_mc\n" + data("mc.jsonl") + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    (tmp_path / "kv_gen.yaml").write_text(
        "task: kv_gen\n" + data("gen.jsonl") + "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs: {until: [\"e\"], do_sample: false, max_gen_toks: 12}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    return str(tmp_path)


def _float64_loglikelihood(model, context, continuation):
    ids = [*context, *continuation]
    with torch.no_grad():
        logp = torch.log_softmax(model.double()(torch.tensor([ids[:-1]]))[0].double(), -1)
    rows = range(len(context) - 1, len(ids) - 1)
    ll = sum(float(logp[r, ids[r + 1]]) for r in rows)
    return ll, all(int(logp[r].argmax()) == ids[r + 1] for r in rows)


def test_loglikelihoods_equal_a_float64_computation_and_lm_evals_accuracy_follows_them(small, tmp_path):
    model = kvlab.load(small)
    lm = KvlabLM(model, batch_size=2)
    tok = model.tokenizer
    reference = kvlab.load(small)
    picks = []
    for doc in MC:
        ctx = tok.encode(doc["question"], add_special_tokens=False)
        lls = []
        for choice in doc["choices"]:
            got, greedy = lm._loglikelihood_tokens([(None, ctx, tok.encode(choice, add_special_tokens=False))])[0]
            want, want_greedy = _float64_loglikelihood(reference, ctx, tok.encode(choice, add_special_tokens=False))
            assert got == pytest.approx(want, rel=1e-4) and greedy == want_greedy
            lls.append(want)
        picks.append(max(range(3), key=lls.__getitem__) == doc["label"])
    results = run_tasks(model, ["kv_mc"], include_path=_tasks(tmp_path), batch_size=3)
    assert results["kv_mc"]["acc,none"] == pytest.approx(sum(picks) / len(picks))


def test_generation_is_greedy_and_cut_at_the_stop_strings(small, tmp_path):
    from kvlab.inference.generation import generate

    model = kvlab.load(small)
    tok = model.tokenizer
    results = run_tasks(model, ["kv_gen"], include_path=_tasks(tmp_path))
    assert results["kv_gen"]["exact_match,none"] == 0          # "x" is never what a cut reply equals
    lm = KvlabLM(model)

    class Request:
        def __init__(self, *args):
            self.args = args

    replies = lm.generate_until([Request("the river", {"until": ["e"], "max_gen_toks": 12})])
    new = generate(model, [tok.encode("the river", add_special_tokens=False)], 12, stop_tokens=[tok.eos_token_id])[0]
    assert replies == [tok.decode([t for t in new if t != tok.eos_token_id], skip_special_tokens=True).split("e")[0]]


def test_rolling_loglikelihood_is_kvlabs_perplexity_on_the_same_text(small):
    model = kvlab.load(small)
    text = "the river rose and the ferry ran twice, then the river fell."

    class Request:
        args = (text,)

    total = KvlabLM(model).loglikelihood_rolling([Request()])[0]
    ev = evaluate(model, model.tokenizer, [Document("t", text)], seq_len=256, progress=False)
    assert -total == pytest.approx(ev.nll, rel=1e-4) and math.exp(-total / ev.tokens) == pytest.approx(ev.perplexity,
                                                                                                        rel=1e-4)


def test_kvlab_eval_runs_lm_eval_tasks_beside_the_original(small, tmp_path, capsys):
    include = _tasks(tmp_path)
    code = main(["eval", str(small), "--original", str(small), "--tasks", "kv_mc", "--include-path", include,
                 "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["lm_eval"]["kv_mc"]["acc,none"] == out["original_lm_eval"]["kv_mc"]["acc,none"]
    code = main(["eval", str(small), "--tasks", "no_such_task_anywhere", "--include-path", include])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_task_anywhere" in err and len(err.strip().splitlines()) == 1

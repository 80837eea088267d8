"""``kvlab shrink`` end to end on a small trained model (``--quick``), its budget arithmetic against
closed forms, its resume, and its refusal to write where it should not."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvlab
from kvlab import ConfigError, ModelConfig
from kvlab.cli import main
from kvlab.data.corpus import builtin_corpus
from kvlab.data.sources import read_documents
from kvlab.eval.fidelity import fidelity
from kvlab.eval.perplexity import evaluate
from kvlab.recipes.pretrain import new_byte_level_model
from kvlab.recipes.shrink import ShrinkConfig, enumerate_candidates, parse_kv_budget, run_shrink

# Recovery of a structure, whatever its speed: what the tests of training text and trainable sets need.
STRUCTURE = dict(precisions=("none",), allow_slower=True)


def test_quick_shrink_end_to_end(small, tmp_path):
    out = tmp_path / "out"
    # Structures only, and any speed: the ranking's top two are recovered (the speed gate and the
    # precisions have tests of their own below, where their outcome does not hang on a timing).
    assert main(["shrink", str(small), "--kv", "2x", "--quick", "--refit", "--candidates", "2", "--precisions", "none",
                 "--allow-slower", "-o", str(out)]) == 0
    for name in ("report.md", "results.json", "pareto.png", "recovery.png", "model/config.json"):
        assert (out / name).is_file(), name
    assert not (out / "work").exists()
    results = json.loads((out / "results.json").read_text())
    budget = results["budget_bytes_per_token"]
    assert budget == 512 // 2 == results["original"]["kv_bytes"] // 2
    names = [r["name"] for r in results["ranking"]]
    assert {"MQA", "GQA-2-CLA2", "MLA 28+4", "MLA 24+8", "Low-rank K8+V24", "Low-rank K16+V16"} <= set(names)
    assert all(r["kv_bytes"] <= budget for r in results["ranking"])
    # The best few were scored on every proxy window and come first; each part is in order.
    full = [r for r in results["ranking"] if r["proxy_tokens"] == results["ranking"][0]["proxy_tokens"]]
    rest = results["ranking"][len(full):]
    assert len(full) == 3 and all(r["proxy_tokens"] < full[0]["proxy_tokens"] for r in rest)
    for part in (full, rest):
        assert [r["alpha0_proxy_ppl"] for r in part] == sorted(r["alpha0_proxy_ppl"] for r in part)
    recovered = results["recovered"]
    assert [r["name"] for r in recovered] == names[:2] == results["chosen"]
    assert all(set(r["speed"]) == {"256"} and r["speed"]["256"]["rounds"] == 5 for r in recovered)
    for r in recovered:
        tokens = [t for t, _ in r["curve"]]
        assert tokens[0] == 0 and tokens == sorted(tokens) and tokens[-1] == r["train_tokens"] > 0
        # the output refit is the curve's second point, at 0 tokens, and the provenance has it
        assert tokens[1] == 0 and math.isfinite(r["refit_proxy_ppl"])
        assert r["curve"][1][1] == (r["refit_proxy_ppl"] if r["refit_used"] else r["curve"][0][1])
        assert math.isfinite(r["val"]["perplexity"])
    best = next(r for r in recovered if r["name"] == results["best"])
    assert best["proxy_ppl"] == min(r["proxy_ppl"] for r in recovered)
    # The saved model is the one evaluated: recompute its validation perplexity independently.
    model = kvlab.load(out / "model")
    assert model.cfg.kv_bytes_per_token("bf16") == best["kv_bytes"]
    again = evaluate(model, model.tokenizer, builtin_corpus("validation"), seq_len=64, max_tokens=512, progress=False)
    assert again.perplexity == pytest.approx(best["val"]["perplexity"], rel=1e-5)
    assert model.provenance["steps"][-1]["op"] == "shrink"
    ops = ["convert", "refit", "shrink"] if best["refit_used"] else ["convert", "shrink"]   # an undone refit is not
    assert [s["op"] for s in model.provenance["steps"]][-len(ops):] == ops                  # in the provenance
    report = (out / "report.md").read_text()
    assert f"**Chosen: {results['best']}**" in report and "| original |" in report
    # The serving gain: both models through the engine at one budget, which holds one original sequence
    # and, at half the bytes per token, at least two of the chosen one.
    serving = results["serving"]
    assert serving["original_running"] == 1 and 2 <= serving["candidate_running"] <= serving["clients"] == 4
    assert serving["original_tok_s"] > 0 and serving["gain"] == pytest.approx(
        serving["candidate_tok_s"] / serving["original_tok_s"])
    assert "## Serving gain" in report
    if results["hf_export"]:
        hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
        tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-4, atol=5e-4)
    else:
        assert results["hf_note"]


def test_an_interrupted_shrink_resumes_to_the_same_result(small, tmp_path):
    def quick(candidates: int) -> ShrinkConfig:          # with the output refit, which must resume too
        return ShrinkConfig.quick(candidates=candidates, refit=True, precisions=("none",), allow_slower=True)

    whole = run_shrink(str(small), tmp_path / "whole", quick(2), log=lambda s: None)

    class Stop(Exception):
        pass

    def stop_after_the_first_candidate(line):
        if "; decode step" in line:
            raise Stop
    with pytest.raises(Stop):
        run_shrink(str(small), tmp_path / "cut", quick(2), log=stop_after_the_first_candidate)
    state = json.loads((tmp_path / "cut" / "shrink_state.json").read_text())
    assert "ranking" in state and not state.get("recovered")
    with pytest.raises(ConfigError, match="holds a kvlab shrink run: --resume continues it"):
        run_shrink(str(small), tmp_path / "cut", quick(2), log=lambda s: None)
    with pytest.raises(ConfigError, match="other settings.*candidates 2 -> 1"):
        run_shrink(str(small), tmp_path / "cut", quick(1), resume=True, log=lambda s: None)
    resumed = run_shrink(str(small), tmp_path / "cut", quick(2), resume=True,
                         log=lambda s: None)
    def ppl(results):
        return [r["val"]["perplexity"] for r in results["recovered"]]
    assert ppl(resumed) == ppl(whole)
    assert resumed["best"] == whole["best"]


def test_shrink_can_train_on_text_the_original_generates(small, tmp_path):
    scfg = ShrinkConfig.quick(candidates=1, data="generated", generated_tokens=300, **STRUCTURE)
    results = run_shrink(str(small), tmp_path / "gen", scfg, log=lambda s: None)
    assert results["config"]["data"] == "generated" and results["recovered"][0]["train_tokens"] > 0
    assert not (tmp_path / "gen" / "work").exists()


def test_shrink_calibrates_and_trains_on_the_users_text_and_scores_its_held_out_split(small, tmp_path):
    """--data with the user's files in a weighted mix: the final numbers are the held-out split of those
    files (recomputed here from the files), the calibration and training read their train side."""
    notes = tmp_path / "notes"
    notes.mkdir()
    for k in range(12):       # text of a kind the built-in corpus (Python docs) does not have
        (notes / f"day{k:02d}.md").write_text("".join(f"Day {k}, entry {i}: the river rose {i % 7} cm and the "
                                                      f"ferry ran {12 - i % 5} times.\n" for i in range(30)))
    (notes / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"How high is the river on day {k}?"},
        {"role": "assistant", "content": f"It rose {k % 7} cm."}]}) + "\n" for k in range(40)))
    lines = []
    results = run_shrink(str(small), tmp_path / "out", ShrinkConfig.quick(candidates=1, data=f"{notes}:0.8,builtin:0.2",
                                                                          **STRUCTURE), log=lines.append)
    assert results["validation_text"] == f"the held-out split of --data {notes}"
    assert any(f"--data {notes}:" in line and "training tokens" in line for line in lines)
    original = kvlab.load(small)
    held_out = read_documents(f"{notes}:validation", tokenizer=original.tokenizer)
    train_side = read_documents(f"{notes}:train", tokenizer=original.tokenizer)
    assert held_out and train_side and not {d.text for d in held_out} & {d.text for d in train_side}
    again = evaluate(original, original.tokenizer, held_out, seq_len=64, max_tokens=512, progress=False)
    assert again.perplexity == pytest.approx(results["original"]["val"]["perplexity"], rel=1e-5)
    assert results["recovered"][0]["train_tokens"] > 0
    # Fidelity to the original on the same held-out text, recomputed from the saved model.
    shrunk = kvlab.load(tmp_path / "out" / "model")
    fid = fidelity(original, shrunk, original.tokenizer, held_out, seq_len=64, max_tokens=512)
    got = results["recovered"][0]["fidelity"]
    assert got["kl"] == pytest.approx(fid.kl, rel=1e-4) and got["top1_agreement"] == pytest.approx(fid.top1_agreement)
    assert 0 < got["kl"] and 0 < got["top1_agreement"] <= 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "held-out split of --data" in report and "KL to original" in report


def test_the_users_text_must_hold_a_training_window_and_nothing_is_left_behind(small, tmp_path):
    (tmp_path / "notes.txt").write_text("".join(f"note {i:04d}: short.\n" for i in range(300)))   # 5,700 bytes
    with pytest.raises(ConfigError, match="fewer than one training window of 8,194"):
        run_shrink(str(small), tmp_path / "out", ShrinkConfig.quick(data=str(tmp_path / "notes.txt"), seq_len=8192),
                   log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_an_output_directory_with_other_files_is_refused_untouched(small, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my work")
    assert main(["shrink", str(small), "--quick", "-o", str(out)]) == 2
    assert "1 entry kvlab did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "my work"


def test_budgets_and_candidates_of_smollm2_in_closed_form():
    cfg = ModelConfig.from_preset("smollm2-135m")          # 30 layers, 3 KV heads of 64: 23,040 B/token
    assert parse_kv_budget("2x", cfg) == 11520 and parse_kv_budget("6x", cfg) == 3840
    assert parse_kv_budget("7000", cfg) == 7000
    got = {c.name: c.kv_bytes for c in enumerate_candidates(cfg, 11520, precisions=(None,))}
    assert got == {"GQA-3-CLA2": 2 * 15 * 3 * 64 * 2, "MQA": 2 * 30 * 64 * 2,
                   "MLA 176+16": 30 * 192 * 2, "MLA 160+32": 30 * 192 * 2, "MLA 144+48": 30 * 192 * 2,
                   "Low-rank K48+V144": 30 * 192 * 2, "Low-rank K64+V128": 30 * 192 * 2,
                   "Low-rank K96+V96": 30 * 192 * 2, "Low-rank 192 allocated": 30 * 192 * 2}
    got = {c.name: c.kv_bytes for c in enumerate_candidates(cfg, 3840, precisions=(None,))}
    assert got["MQA-CLA2"] == 3840 and got["GQA-3-CLA6"] == 3840 and got["MLA 32+32"] == 3840
    assert got["Low-rank K21+V43"] == got["Low-rank K32+V32"] == got["Low-rank 64 allocated"] == 3840 == 30 * 64 * 2
    for bad in ("1x", "0.5x", "abc", "-3"):
        with pytest.raises(ConfigError, match="--kv"):
            parse_kv_budget(bad, cfg)
    with pytest.raises(ConfigError, match="within the budget"):
        enumerate_candidates(cfg, 30000)


@pytest.mark.parametrize("train_set", ["attention", "lora"])
def test_distillation_trains_lora_on_the_mlps_and_merges_it(small, tmp_path, train_set):
    """--train lora: the attention trains in full, LoRA trains the MLPs and is merged into the
    saved model (a plain checkpoint); --train attention leaves the MLPs as they were."""
    out = tmp_path / train_set
    results = run_shrink(str(small), out, ShrinkConfig.quick(candidates=1, train=train_set, lora_rank=4, **STRUCTURE),
                         log=lambda s: None)
    assert results["recovered"][0]["train_tokens"] > 0
    original, shrunk = kvlab.load(small), kvlab.load(out / "model")
    assert not [n for n, _ in shrunk.named_parameters() if "lora" in n]
    mlp = [n for n, _ in original.named_parameters() if ".mlp." in n]
    changed = {n for n in mlp if not torch.equal(original.state_dict()[n], shrunk.state_dict()[n])}
    if train_set == "lora":
        assert changed == {n for n in mlp if n.endswith("_proj.weight")}
    else:
        assert not changed
    # The numbers in results.json are the saved (merged) model's.
    again = evaluate(shrunk, shrunk.tokenizer, builtin_corpus("validation"), seq_len=64, max_tokens=512,
                     progress=False)
    assert again.perplexity == pytest.approx(results["recovered"][0]["val"]["perplexity"], rel=1e-5)


def test_shrink_settings_are_checked():
    with pytest.raises(ConfigError, match="--train 'adapter'"):
        ShrinkConfig.quick(train="adapter")
    with pytest.raises(ConfigError, match="--lora-rank 0"):
        ShrinkConfig.quick(train="lora", lora_rank=0)
    with pytest.raises(ConfigError, match="data 'web' not found"):
        ShrinkConfig.quick(data="web")


def test_shrink_can_train_on_the_library_corpus(small, tmp_path):
    lines = []
    results = run_shrink(str(small), tmp_path / "lib", ShrinkConfig.quick(candidates=1, data="library", **STRUCTURE),
                         log=lines.append)
    assert results["config"]["data"] == "library" and results["recovered"][0]["train_tokens"] > 0
    said = next(line for line in lines if "tokens of training text" in line)
    builtin_bytes = sum(len(d.text.encode()) for d in builtin_corpus("train"))
    assert int(said.split()[0].replace(",", "")) > 8 * builtin_bytes      # byte-level tokens


# ---- precision as a candidate, and speed in the choice ----
def _int4_bytes_per_vector(width: int) -> int:
    """q4_1: two channels a byte, a float16 scale and minimum per group of 32 (one group if 32 does
    not divide the width)."""
    return width // 2 + 4 * (width // 32 if width % 32 == 0 else 1)


def test_precisions_are_candidates_alone_and_composed_with_structures():
    cfg = ModelConfig.from_preset("smollm2-135m")            # 30 layers, 3 KV heads of 64: 23,040 B/token
    cands = {c.name: c for c in enumerate_candidates(cfg, 11520)}
    # Alone: fp8 is one byte a value, exactly half; int4 fits too; int8 with its scales (8.5 bits) does not.
    assert cands["fp8 cache"].kv_bytes == 30 * 2 * 3 * 64 == 11520
    assert cands["int4 cache"].kv_bytes == 30 * 2 * 3 * _int4_bytes_per_vector(64) == 7200
    assert "int8 cache" not in cands
    # int8 keys with int4 values: 8.5 + 5 bits a value over the two halves
    assert cands["int8/int4 cache"].kv_bytes == 30 * 3 * (64 + 2 * 2 + _int4_bytes_per_vector(64)) == 9720
    # Composed: only with int8, the one precision whose plain cache does not fit; a structure stored in
    # fp8 or int4 would keep less of the model than the plain fp8 or int4 cache at the same budget.
    composed = [c for c in cands.values() if c.restructured and c.precision]
    assert composed and {c.precision for c in composed} == {"int8"}
    assert all(c.kv_bytes <= 11520 for c in cands.values())
    for c in composed:   # whole int8 groups of 32, as wide as the budget allows: one more group would not fit
        if c.family == "mla":
            width = c.change["kv_lora_rank"] + c.change["qk_rope_head_dim"]
            assert width % 32 == 0 and c.change["kv_lora_rank"] % 32 == 0    # no group mixes latent and RoPE
            more = ModelConfig.from_preset("smollm2-135m").replace(
                attn_kind="mla", n_kv_head=9, attn_options={"kv_lora_rank": c.change["kv_lora_rank"] + 32,
                                                            "qk_rope_head_dim": c.change["qk_rope_head_dim"]})
            assert more.kv_bytes_per_token("bf16", "int8") > 11520 or \
                c.change["kv_lora_rank"] + 32 > 3 * (2 * 64 - c.change["qk_rope_head_dim"])
        elif c.family == "lowrank":
            assert (c.change.get("channels") or c.change["k_rank"] + c.change["v_rank"]) % 32 == 0
            assert c.change.get("multiple", 32) == 32
    # At 4x no plain cache fits (int4's scales make it 5 bits a value): every precision composes.
    at4 = enumerate_candidates(cfg, 5760)
    assert not [c for c in at4 if not c.restructured]
    assert {c.precision for c in at4} == {None, "fp8", "int8", "int8/int4", "int4", "int8/int4-h", "int4-h"}
    # keys and values in two formats compose only with structures that cache them apart (GQA/MQA/CLA)
    assert {c.family for c in at4 if c.precision in ("int8/int4", "int8/int4-h")} == {"heads"}
    # a rotated format costs its plain twin's bytes; where a runtime stores both, the plain one goes
    rotated = {c.name: c.kv_bytes for c in at4 if c.precision == "int4-h"}
    assert rotated and rotated == {c.name.replace("int4", "int4-h"): c.kv_bytes for c in at4 if c.precision == "int4"}
    from kvlab.recipes.shrink.candidates import undominated
    assert undominated([None, "int8", "int8/int4", "int4", "int8/int4-h", "int4-h", "by-layer"]) == [
        None, "int8", "int8/int4-h", "int4-h", "by-layer"]
    assert undominated([None, "int8", "int4"]) == [None, "int8", "int4"]


class _Ratio:
    def __init__(self, ratio):
        self.ratio, self.ratio_min, self.ratio_max = ratio, ratio, ratio
        self.candidate_ms, self.original_ms = 10 * ratio, 10.0

    def to_dict(self):
        return {"ratio": self.ratio, "ratio_min": self.ratio, "ratio_max": self.ratio}


def test_the_speed_gate_passes_over_slower_candidates(monkeypatch):
    from kvlab.recipes.shrink import ranking
    from kvlab.recipes.shrink.state import RankedCandidate

    speeds = {"A": 1.6, "B": 1.0, "C": 1.3, "D": 0.9, "E": 1.02}
    measured = []

    def fake_speed(base, cand, scfg, context):
        measured.append(cand.name)
        return _Ratio(speeds[cand.name])
    monkeypatch.setattr(ranking, "speed_of", fake_speed)
    entries = [RankedCandidate("A", "lowrank", "lowrank", {}, 1, None, 10.0, 8),
               RankedCandidate("B", "cache", "gqa", {}, 1, "fp8", 10.1, 8),
               RankedCandidate("C", "lowrank", "lowrank", {}, 1, None, 10.2, 8),   # as slow as A: not measured
               RankedCandidate("D", "mla", "mla", {}, 1, None, 10.3, 8),
               RankedCandidate("E", "heads", "gqa", {}, 1, None, 10.4, 8)]
    assert ranking.choose(None, entries, ShrinkConfig.quick(candidates=2), 64, lambda s: None) == ["B", "D"]
    assert measured == ["A", "B", "D"] and entries[2].speed == {"as": "A"} and entries[4].speed is None
    measured.clear()
    assert ranking.choose(None, entries, ShrinkConfig.quick(candidates=2, allow_slower=True), 64,
                          lambda s: None) == ["A", "B"]
    speeds.update(B=1.2, D=1.1, E=1.5)
    with pytest.raises(ConfigError, match="every candidate within the budget decodes slower than the original"):
        ranking.choose(None, entries, ShrinkConfig.quick(candidates=2), 64, lambda s: None)


def test_a_quantized_cache_of_the_original_wins_where_it_should(small, tmp_path, monkeypatch):
    """At 2x with every candidate taken as fast, the fp8 cache of the original model (no conversion,
    nothing to train) keeps more than any structure: it is chosen, saved unchanged, scored through an
    fp8 cache, and the report says that quantization alone wins and how each runtime gives it."""
    from kvlab.recipes.shrink import ranking

    monkeypatch.setattr(ranking, "speed_of", lambda base, cand, scfg, context: _Ratio(1.0))
    out = tmp_path / "q"
    # (the formats a runtime shares, keys as projected: a rotated or per-layer cache of the original, or
    # balanced keys, are kvlab's own — with balanced keys int4 overtakes fp8 on this model)
    results = run_shrink(str(small), out, ShrinkConfig.quick(candidates=1, precisions=("none", "fp8", "int8", "int4"),
                                                             balance_keys=False), log=lambda s: None)
    assert results["best"] == "fp8 cache" == results["chosen"][0]
    best = results["recovered"][0]
    assert best["family"] == "cache" and best["precision"] == "fp8" and best["train_tokens"] == 0
    original, saved = kvlab.load(small), kvlab.load(out / "model")
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in original.state_dict().items())
    assert saved.provenance["steps"][-1]["kv_cache"] == "fp8"
    want = evaluate(original, original.tokenizer, builtin_corpus("validation"), seq_len=64, max_tokens=512,
                    progress=False, kv_quant="fp8")
    assert best["val"]["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    plain = evaluate(original, original.tokenizer, builtin_corpus("validation"), seq_len=64, max_tokens=512,
                     progress=False)
    assert best["val"]["perplexity"] != plain.perplexity              # the cache really was fp8
    report = (out / "report.md").read_text()
    assert "Quantization alone wins" in report and "--kv-cache-dtype fp8" in report and "kvlab serve model/ " \
        "--kv-quant fp8" in report
    int4 = next(r for r in results["ranking"] if r["name"] == "int4 cache")
    assert int4["kv_bytes"] < results["budget_bytes_per_token"] and int4["precision"] == "int4"


def test_decode_ratio_reports_its_rounds():
    from kvlab.cache.quantized import QuantizedTokenLayer
    from kvlab.dtypes import parse_kv_quant
    from kvlab.recipes.shrink import speed

    model = new_byte_level_model(ModelConfig.from_preset("tiny"))
    seen = []
    real = speed._Stepper.__init__

    def spy(self, m, kv_quant, batch, context, seed):
        real(self, m, kv_quant, batch, context, seed)
        seen.append({type(layer) for layer in self.cache.layers.values()})
    speed._Stepper.__init__ = spy
    try:
        r = speed.decode_ratio(model, model, parse_kv_quant("int8"), batch=2, context=16, rounds=3)
    finally:
        speed._Stepper.__init__ = real
    assert r.rounds == 3 and r.ratio_min <= r.ratio <= r.ratio_max and r.context == 16 and r.batch == 2
    assert r.clock == "process CPU, 1 thread" and torch.get_num_threads() >= 1
    assert seen[0] != {QuantizedTokenLayer} and seen[1] == {QuantizedTokenLayer}     # the candidate's cache is int8


def test_transfer_is_skipped_only_for_loss_fitted_starts_close_to_the_original():
    """A low-rank start fitted by the loss is exact at full width, and transfer would trade it away; an
    MLA start fitted by the loss is still far from the original (rotation dropped): it keeps transfer."""
    from kvlab.recipes.shrink.planning import transfer_fraction

    cfg = ModelConfig.from_preset("smollm2-135m")
    scfg = ShrinkConfig()
    by_family = {}
    for c in enumerate_candidates(cfg, 11520):
        by_family.setdefault((c.family, c.loss_fitted), c)
    assert transfer_fraction(scfg, by_family["lowrank", True]) == 0.0
    assert transfer_fraction(scfg, by_family["lowrank", False]) == scfg.transfer_fraction > 0
    assert transfer_fraction(scfg, by_family["mla", True]) == scfg.transfer_fraction
    assert ("mla", False) not in by_family                    # every MLA start is fitted in the loss's metric


def test_the_clis_default_precisions_are_the_recipes():
    import argparse

    from kvlab.cli import shrink as cli_shrink
    from kvlab.recipes.shrink.config import PRECISION_NAMES

    sub = argparse.ArgumentParser().add_subparsers()
    cli_shrink.add_parser(sub)
    parser = sub.choices["shrink"]
    assert parser.get_default("precisions") == ",".join(PRECISION_NAMES)


def test_the_report_serves_a_precision_per_layer_with_kvlabs_flag():
    from kvlab.recipes.shrink.report import _serve_lines

    spec = "int8+int8/int4@0-2"
    results = {"best": "by-layer cache", "recovered": [{"name": "by-layer cache", "family": "cache",
                                                        "precision": spec}]}
    text = "\n".join(_serve_lines(results))
    assert f"kvlab serve model/ --kv-quant {spec}" in text and "a value format per layer" in text
    assert "Any runtime with such a cache" not in text and "no precision per layer" in text


def test_integer_caches_of_the_original_hold_balanced_keys_where_kvlab_serves_them(small, tmp_path, monkeypatch):
    """For --target kvlab the original's int4 cache is ranked, chosen and saved with its keys balanced
    (kvlab.convert.balance): the saved model computes what the original does, its score is its own int4
    cache's, and the report says other runtimes round the keys as projected. --no-balance-keys (and any
    other target) keeps them as projected."""
    from kvlab.recipes.shrink import ranking
    from kvlab.recipes.shrink.targets import get_target

    monkeypatch.setattr(ranking, "speed_of", lambda base, cand, scfg, context: _Ratio(1.0))
    scores = {}
    for balance in (True, False):
        out = tmp_path / f"b{balance}"
        results = run_shrink(str(small), out, ShrinkConfig.quick(candidates=1, precisions=("int4",), kv="2x",
                                                                 balance_keys=balance), log=lambda s: None)
        best = results["recovered"][0]
        assert best["name"] == "int4 cache" and results["keys_balanced"] is balance
        saved, original = kvlab.load(out / "model"), kvlab.load(small)
        assert saved.cfg.key_balance is balance
        tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(saved(tokens), original(tokens), rtol=1e-4, atol=1e-4)
        want = evaluate(saved, saved.tokenizer, builtin_corpus("validation"), seq_len=64, max_tokens=512,
                        progress=False, kv_quant="int4")
        assert best["val"]["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
        scores[balance] = best["val"]["perplexity"]
        assert ("balanced against the queries" in (out / "report.md").read_text()) is balance
    assert scores[True] != scores[False]
    assert [get_target(t).balances_keys for t in ("kvlab", "transformers", "vllm", "llama.cpp")] == [True] + [False] * 3


def test_a_composed_candidate_is_also_scored_without_its_quantized_cache(small, tmp_path):
    """A structure with a quantized cache: the report's 'structure alone' is the saved model's validation
    perplexity with a float cache (independently recomputed here), beside the composed one's."""
    out = tmp_path / "composed"
    results = run_shrink(str(small), out, ShrinkConfig.quick(candidates=1, precisions=("int8",), kv="4x",
                                                             allow_slower=True), log=lambda s: None)
    best = results["recovered"][0]
    assert best["precision"] == "int8" and best["family"] != "quantized"
    saved = kvlab.load(out / "model")
    alone = evaluate(saved, saved.tokenizer, builtin_corpus("validation"), seq_len=64, max_tokens=512, progress=False)
    assert best["structure_alone"]["perplexity"] == pytest.approx(alone.perplexity, rel=1e-6)
    assert best["structure_alone"]["perplexity"] != best["val"]["perplexity"]
    assert "structure alone" in (out / "report.md").read_text()

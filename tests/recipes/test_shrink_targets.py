"""``kvlab shrink --target``: each runtime's candidates are exactly those its format holds (checked
against the exporters and the runtimes' KV types), and the chosen model is written in that format,
which transformers (an HF directory) and kvlab's GGUF reader (a llama GGUF) load with the same logits."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import kvlab
from deepseek2_reference import deepseek2_logits
from kvlab import ConfigError, ModelConfig
from kvlab.cli import main
from kvlab.io.gguf_export import gguf_architecture, gguf_problems
from kvlab.io.hf import config_to_hf
from kvlab.recipes.shrink import ShrinkConfig, enumerate_candidates, run_shrink
from kvlab.recipes.shrink.candidates import admitted_by, plan_candidate
from kvlab.recipes.shrink.targets import TARGETS, get_target, llama_cpp_cache_types

SMOLLM2 = ModelConfig.from_preset("smollm2-135m")


def _split(target: str, budget: int):
    every = enumerate_candidates(SMOLLM2, budget)
    admitted, refused = admitted_by(get_target(target), SMOLLM2, every)
    assert len(admitted) + len(refused) == len(every)
    return admitted, refused


@pytest.mark.parametrize("budget", [11520, 5760, 2880])
def test_transformers_gets_what_its_config_holds_in_the_models_precision(budget):
    admitted, refused = _split("transformers", budget)
    for c in admitted:
        assert c.precision is None
        config_to_hf(plan_candidate(SMOLLM2, c), torch.float32)     # raises if transformers cannot hold it
        assert c.family in ("heads", "mla") and c.change.get("cla", 1) == 1
    kinds = {c.family for c in enumerate_candidates(SMOLLM2, budget) if c.name in refused}
    assert "lowrank" in kinds or budget == 11520
    assert any("Cross-Layer Attention" in r for r in refused.values())


@pytest.mark.parametrize("budget", [11520, 5760])
def test_llama_cpp_gets_llama_ggufs_with_its_cache_types(budget):
    admitted, refused = _split("llama.cpp", budget)
    assert admitted
    for c in admitted:
        assert c.precision in (None, "int8", "int4", "int8/int4") and c.family in ("cache", "heads", "mla")
        assert gguf_problems(plan_candidate(SMOLLM2, c)) == []
    if budget == 11520:     # keys and values in two of llama.cpp's types: its -ctk and -ctv flags apart
        assert "int8/int4 cache" in {c.name for c in admitted}
    assert any(c.family == "mla" for c in admitted)           # as llama.cpp's deepseek2 (kvlab.io.gguf_export)
    assert any("'lowrank' attention kind" in r for r in refused.values())
    assert all(c.precision != "fp8" for c in admitted) and any("fp8 caches" in r for r in refused.values())


def test_vllm_runs_fp8_caches_and_deepseeks_mla_widths_only():
    admitted, refused = _split("vllm", 11520)
    assert {c.name for c in admitted if c.family == "cache"} == {"fp8 cache"}
    assert not [c for c in admitted if c.family == "mla"]          # 512 + 64 exceeds SmolLM2's whole cache
    assert any("vLLM's MLA kernels are built for DeepSeek's latent 512" in r for r in refused.values())
    wide = ModelConfig.from_preset("smollm2-135m", n_kv_head=9)       # 9 KV heads: 576 channels a layer fit
    planned = wide.replace(attn_kind="mla", attn_options={"kv_lora_rank": 512, "qk_rope_head_dim": 64})
    assert TARGETS["vllm"].refusal(planned, "fp8") is None
    assert TARGETS["vllm"].refusal(planned, "int8").startswith("int8 caches")


def test_llama_cpp_serves_keys_and_values_in_two_types():
    lines = TARGETS["llama.cpp"].serve_command(".", "int8/int4")
    assert "$ llama-server -m ./model.gguf -ctk q8_0 -ctv q4_1 -fa on" in lines
    assert "-ctk q4_1 -ctv q4_1 -fa on" in "\n".join(TARGETS["llama.cpp"].serve_command(".", "int4"))
    assert TARGETS["vllm"].refusal(SMOLLM2, "int8/int4").startswith("int8/int4 caches")


def test_a_target_that_runs_nothing_within_the_budget_is_refused_in_one_line(small, tmp_path):
    with pytest.raises(ConfigError, match="--target transformers stores none of --precisions fp8"):
        run_shrink(str(small), tmp_path / "a", ShrinkConfig.quick(target="transformers", precisions=("fp8",)),
                   log=lambda s: None)
    with pytest.raises(ConfigError, match="not one of kvlab, transformers, vllm, llama.cpp"):
        ShrinkConfig.quick(target="tgi")


def test_target_transformers_writes_an_hf_directory_with_the_same_logits(small, tmp_path):
    out = tmp_path / "out"
    assert main(["shrink", str(small), "--kv", "2x", "--quick", "--target", "transformers", "--allow-slower",
                 "-o", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["target"] == "transformers" and results["target_output"] == "hf"
    assert all(r["precision"] is None and r["family"] in ("heads", "mla") for r in results["ranking"])
    assert results["refused"] and any("Low-rank" in name for name in results["refused"])
    model = kvlab.load(out / "model")
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-4, atol=1e-4)
    report = (out / "report.md").read_text()
    assert "## In transformers" in report and "AutoModelForCausalLM.from_pretrained('./hf')" in report
    assert "Left out because transformers does not run them natively" in report


@pytest.fixture(scope="module")
def small_on_smollm2_vocab(smollm2, tmp_path_factory):
    """A tiny random model with SmolLM2's HF tokenizer (a GGUF carries the tokenizer), saved."""
    from kvlab import Transformer
    from kvlab.io import save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=smollm2.cfg.vocab_size, d_model=64, n_layer=2, n_head=4,
                                  n_kv_head=2, d_ff=128, max_seq_len=256, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=2)
    model = Transformer(cfg).eval()
    model.tokenizer = smollm2.tokenizer
    path = tmp_path_factory.mktemp("vocab") / "model"
    save_checkpoint(model, path)
    return path


def test_target_llama_cpp_refuses_a_model_without_an_hf_tokenizer_before_any_work(small, tmp_path, capsys):
    assert main(["shrink", str(small), "--quick", "--target", "llama.cpp", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--target llama.cpp: the model has no HF tokenizer" in err and "scoring" not in err


def test_target_llama_cpp_writes_a_gguf_that_reads_back_as_the_model(small_on_smollm2_vocab, tmp_path):
    out = tmp_path / "out"
    assert main(["shrink", str(small_on_smollm2_vocab), "--kv", "2x", "--quick", "--target", "llama.cpp",
                 "--allow-slower", "-o", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["target_output"] == "model.gguf"
    assert all(r["family"] in ("cache", "heads", "mla") and r["precision"] in (None, "int8", "int4", "int8/int4")
               for r in results["ranking"])
    model = kvlab.load(out / "model")
    tokens = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    if gguf_architecture(model.cfg) == "deepseek2":          # MLA: llama.cpp's graph, from the file
        with torch.no_grad():
            want = model(tokens[:1]).double()[0].numpy()
        got = deepseek2_logits(out / "model.gguf", tokens[0].tolist())
        assert np.abs(got - want).max() < 2e-2              # f16 weights in the file
    else:
        gguf = kvlab.load(out / "model.gguf")
        assert gguf.cfg.n_kv_head == model.cfg.n_kv_head and gguf.cfg.n_kv_layers == gguf.cfg.n_layer
        with torch.no_grad():                               # f16 weights in the file
            torch.testing.assert_close(gguf(tokens), model(tokens), rtol=0, atol=2e-2)
    best = next(r for r in results["recovered"] if r["name"] == results["best"])
    ctk, ctv = llama_cpp_cache_types(best["precision"])
    flags = "" if best["precision"] is None else f" -ctk {ctk} -ctv {ctv} -fa on"
    assert f"$ llama-server -m ./model.gguf{flags}" in (out / "report.md").read_text()

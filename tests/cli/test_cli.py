import json
import subprocess
import sys

import pytest
import torch

import kvlab
from kvlab import generate
from kvlab.cli import main
from kvlab.io import save_checkpoint
from kvlab.io.tokenizer import ByteTokenizer

from conftest import make_model


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json_smollm2(capsys):
    code, out, _ = run(capsys, "info", "--preset", "smollm2-135m", "--json")
    info = json.loads(out)
    assert code == 0
    assert {k: info[k] for k in ("n_layer", "n_head", "n_kv_head", "n_kv_layers", "head_dim",
                                 "kv_bytes_per_token")} == \
        dict(n_layer=30, n_head=9, n_kv_head=3, n_kv_layers=30, head_dim=64, kv_bytes_per_token=23040)
    assert info["params"] == 134_515_008
    code, out, _ = run(capsys, "info", "--preset", "smollm2-135m", "--n-kv-head", "1", "--cla", "2", "--json")
    info = json.loads(out)
    assert (info["kv_bytes_per_token"], info["n_kv_layers"], info["variant"]) == (3840, 15, "MQA-CLA2")


def test_info_table_and_config_file(capsys, tmp_path):
    code, out, _ = run(capsys, "info", "--preset", "llama3-8b", "--dtype", "fp32")
    assert code == 0 and "KV bytes per token (fp32)  262,144" in out and "8,030,261,248" in out
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"d_model": 128, "n_layer": 3, "n_head": 8, "n_kv_head": 2}))
    code, out, _ = run(capsys, "info", "--config", str(path), "--json")
    assert json.loads(out)["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 2


def test_info_on_checkpoint_dir(capsys, tmp_path):
    save_checkpoint(make_model(n_kv_head=1, cla=2), tmp_path / "ckpt")
    code, out, _ = run(capsys, "info", str(tmp_path / "ckpt"), "--json")
    assert code == 0 and json.loads(out)["n_kv_layers"] == 2


def test_plan_json_rows(capsys):
    code, out, _ = run(capsys, "plan", "--preset", "llama2-7b", "--memory", "80GiB", "--context", "4096", "--json")
    assert code == 0
    rows = {r["variant"]: r for r in json.loads(out)["variants"]}
    assert list(rows) == ["MHA", "GQA-16", "GQA-8", "GQA-4", "GQA-2", "MQA", "MHA-CLA2", "MHA-CLA3", "MQA-CLA2"]
    assert rows["MHA"]["is_model"] and not rows["MQA"]["is_model"]
    for r in rows.values():  # closed form, recomputed here
        per_seq = 2 * r["n_kv_layers"] * r["n_kv_head"] * 128 * 2 * 4096
        assert r["kv_bytes_per_sequence"] == per_seq
        assert r["max_batch"] == (80 * 2**30 - r["params"] * 2) // per_seq
    assert rows["MHA"]["max_batch"] == 33 and rows["MQA-CLA2"]["kv_bytes_per_token"] == 8192


def test_plan_table(capsys):
    code, out, _ = run(capsys, "plan", "--preset", "llama2-7b", "--memory", "80GiB", "--context", "4096")
    assert code == 0
    assert "* MHA" in out and "MQA-CLA2" in out and "64.00x smaller" in out
    code, out, _ = run(capsys, "plan", "--preset", "smollm2-135m")
    assert "* GQA-3" in out and "3.00x larger" in out and "6.00x smaller" in out


def test_plan_weights_do_not_fit(capsys):
    code, out, _ = run(capsys, "plan", "--preset", "llama3-8b", "--memory", "8GB", "--json")
    assert all(r["max_batch"] == 0 for r in json.loads(out)["variants"])
    code, out, _ = run(capsys, "plan", "--preset", "llama3-8b", "--memory", "8GB")
    assert "weights do not fit" in out and "one sequence" not in out


def test_plan_says_when_one_sequence_does_not_fit_beside_the_weights(capsys):
    # Llama-2-7B in bf16 is 13.5 GB; 16 GiB leave ~3.7 GB, less than one 16k-token MHA cache (8.6 GB).
    code, out, _ = run(capsys, "plan", "--preset", "llama2-7b", "--memory", "16GiB", "--context", "16384")
    mha = next(line for line in out.splitlines() if "* MHA" in line)
    assert "0 (one sequence's KV won't fit)" in mha and "weights do not fit" not in mha


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--preset", "nope"], "unknown preset 'nope'"),
    (["plan", "--preset", "tiny", "--memory", "lots"], "memory size 'lots' is not understood"),
    (["plan", "--preset", "tiny", "--context", "x"], "--context: invalid int value"),
    (["plan", "--preset", "tiny", "--context", "0"], "context=0 must be a positive"),
    (["info", "--preset", "smollm2-135m", "--n-kv-head", "2"], "n_head=9 is not divisible by n_kv_head=2"),
    (["info", "--preset", "tiny", "--cla", "9"], "cla=9 exceeds n_layer=4"),
    (["info"], "give exactly one of MODEL, --preset NAME or --config FILE"),
    (["info", "--preset", "tiny", "--dtype", "int3"], "invalid choice: 'int3'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: VERB"),
    (["generate", "somewhere"], "give --prompt TEXT or --prompt-ids"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_failures_exit_1(capsys, tmp_path):
    code, _, err = run(capsys, "generate", str(tmp_path / "missing"), "--prompt-ids", "1,2")
    assert code == 1 and "not found" in err


@pytest.mark.parametrize("verb", [[], ["info"], ["plan"], ["generate"]])
def test_help_on_every_verb(capsys, verb):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0 and "usage: kvlab" in capsys.readouterr().out


def test_generate_from_checkpoint(capsys, tmp_path):
    model = make_model()
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    tok = ByteTokenizer()
    expected = generate(model, [tok.encode("hi")], 6, stop_tokens=[])[0]
    code, out, _ = run(capsys, "generate", str(tmp_path / "ckpt"), "--prompt", "hi", "--max-new-tokens", "6",
                       "--no-stop", "--json")
    assert code == 0
    assert json.loads(out)[0]["new_ids"] == expected
    code, out, _ = run(capsys, "generate", str(tmp_path / "ckpt"), "--prompt-ids", "256,104,105",
                       "--prompt-ids", "256,1", "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "3",
                       "--json")
    outs = json.loads(out)
    assert len(outs) == 2 and all(len(o["new_ids"]) <= 4 for o in outs)
    # Streaming mode prints the prompt then the continuation.
    code, out, _ = run(capsys, "generate", str(tmp_path / "ckpt"), "--prompt", "hi", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("hi")


def test_generate_and_eval_with_a_window_at_inference(capsys, tmp_path):
    from kvlab.inference.streaming import with_window

    model = make_model(max_seq_len=32)
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    # StreamingLLM: 4x the training length in a cache of 2 sinks + 8 window entries per layer.
    expected = generate(with_window(model, 8, 2), [[256, 104, 105]], 128, stop_tokens=[])[0]
    code, out, err = run(capsys, "generate", str(tmp_path / "ckpt"), "--prompt-ids", "256,104,105",
                         "--max-new-tokens", "128", "--no-stop", "--window", "8", "--sinks", "2", "--json")
    assert code == 0 and json.loads(out)[0]["new_ids"] == expected
    assert "past the context" not in err            # no distance exceeds sinks + window - 1
    code, out, _ = run(capsys, "generate", str(tmp_path / "ckpt"), "--prompt-ids", "256,104,105",
                       "--max-new-tokens", "128", "--no-stop", "--json")
    assert json.loads(out)[0]["new_ids"] != expected
    code, out, _ = run(capsys, "eval", str(tmp_path / "ckpt"), "--seq-len", "24", "--max-tokens", "200",
                       "--window", "8", "--sinks", "2", "--json")
    assert code == 0 and json.loads(out)["perplexity"] > 1


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "kvlab", "info", "--preset", "tiny", "--json"],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["n_kv_head"] == 2


@pytest.mark.parametrize("verb", [["eval"], ["convert"], ["export"]])
def test_help_on_new_verbs(capsys, verb):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0 and "usage: kvlab" in capsys.readouterr().out


def test_convert_smollm2_to_mqa_and_info_shows_new_kv_bytes(capsys, tmp_path):
    code, out, _ = run(capsys, "convert", "smollm2-135m", "--mqa", "--method", "mean", "-o", str(tmp_path / "mqa"))
    assert code == 0 and "3 -> 1 KV heads" in out and "23,040 -> 7,680" in out
    code, out, _ = run(capsys, "info", str(tmp_path / "mqa"), "--json")
    info = json.loads(out)
    assert (info["n_kv_head"], info["kv_bytes_per_token"]) == (1, 7680)
    prov = json.loads((tmp_path / "mqa" / "provenance.json").read_text())
    assert prov["source"]["builtin"] == "smollm2-135m" and prov["steps"][0]["method"] == "mean"
    assert (tmp_path / "mqa" / "tokenizer.json").is_file()


def test_info_reads_gguf_and_hf_configs_without_weights(capsys):
    code, out, _ = run(capsys, "info", "smollm2-135m", "--json")
    assert code == 0 and json.loads(out)["kv_bytes_per_token"] == 23040


def test_convert_export_eval_generate_on_a_small_checkpoint(capsys, tmp_path):
    model = make_model(n_kv_head=4)
    save_checkpoint(model, tmp_path / "base", tokenizer=ByteTokenizer())
    code, out, _ = run(capsys, "convert", str(tmp_path / "base"), "--kv-heads", "2", "--cla", "2",
                       "-o", str(tmp_path / "gqa-cla"))
    assert code == 0 and "4 -> 2 KV heads, 4 -> 2 KV layers" in out
    code, _, err = run(capsys, "export", str(tmp_path / "gqa-cla"), "--format", "hf", "-o", str(tmp_path / "hf"))
    assert code == 2 and "Cross-Layer Attention" in err and not (tmp_path / "hf").exists()
    code, _, _ = run(capsys, "export", str(tmp_path / "base"), "--format", "hf", "-o", str(tmp_path / "hf"))
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file()
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 5)
    code, out, _ = run(capsys, "eval", str(tmp_path / "gqa-cla"), "--data", str(tmp_path / "t.txt"),
                       "--seq-len", "64", "--json", "--no-progress")
    res = json.loads(out)
    assert code == 0 and res["tokens"] == 220 and res["kv_bytes_per_token_bf16"] == 2 * 2 * 2 * 16 * 2


@pytest.mark.parametrize("argv, needle", [
    (["convert", "smollm2-135m", "-o", "x"], "give --kv-heads G, --mqa and/or --cla K"),
    (["convert", "smollm2-135m", "--mqa", "--kv-heads", "1", "-o", "x"], "not both"),
    (["convert", "smollm2-135m", "--kv-heads", "2", "-o", "x"], "cannot pool n_kv_head=3 into 2"),
    (["eval", "smollm2-135m", "--data", "/no/such/file"], "data '/no/such/file' not found"),
])
def test_new_verbs_usage_errors(capsys, argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "tiny", "--out", "o"], "give exactly one budget"),
    (["train", "--preset", "tiny", "--out", "o", "--max-steps", "5", "--alpha", "0.1"], "got --max-steps, --alpha"),
    (["train", "--preset", "tiny", "--out", "o", "--max-steps", "0"], "max_steps=0 must be a positive integer"),
    (["train", "--out", "o", "--max-steps", "5"], "give exactly one of --preset NAME, --config FILE"),
    (["train", "--preset", "tiny", "--out", "o", "--alpha", "0.1"], "--alpha needs --reference-tokens"),
])
def test_train_usage_errors(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    code, _, err = run(capsys, *argv, "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_convert_calibrated_on_a_small_checkpoint(capsys, tmp_path):
    model = make_model(n_kv_head=4)
    save_checkpoint(model, tmp_path / "base", tokenizer=ByteTokenizer())
    code, out, _ = run(capsys, "convert", str(tmp_path / "base"), "--kv-heads", "2", "--method", "calibrated",
                       "--calibration-tokens", "2048", "-o", str(tmp_path / "gqa"))
    assert code == 0 and "4 -> 2 KV heads" in out and "(calibrated)" in out
    converted = kvlab.load(tmp_path / "gqa")
    step = converted.provenance["steps"][-1]
    assert step["method"] == "calibrated" and step["calibration_tokens"] == 2048
    # the same conversion in Python, on the same calibration windows, gives the same weights
    from kvlab.convert.heads import convert
    from kvlab.data.windows import calibration_batches

    same = convert(model, n_kv_head=2, method="calibrated",
                   calibration=calibration_batches(ByteTokenizer(), 2048))
    for k, v in same.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v)
    code, _, err = run(capsys, "convert", str(tmp_path / "base"), "--kv-heads", "2", "--method", "calibrated",
                       "--calibration-tokens", "0", "-o", str(tmp_path / "x"))
    assert code == 2 and "calibration tokens=0 must be a positive integer" in err and not (tmp_path / "x").exists()


def test_convert_balance_keys_equals_the_python_api(capsys, tmp_path):
    """``--balance-keys`` alone, or after pooling heads: the keys balanced as ``balance_keys`` does on
    calibration windows as long as the model's context (1,024 at most); bad combinations in one line."""
    from kvlab.convert.balance import balance_keys
    from kvlab.convert.heads import convert
    from kvlab.data.windows import calibration_batches

    model = make_model(n_kv_head=4)
    save_checkpoint(model, tmp_path / "base", tokenizer=ByteTokenizer())
    code, out, _ = run(capsys, "convert", str(tmp_path / "base"), "--balance-keys", "--calibration-tokens", "1024",
                       "-o", str(tmp_path / "bal"))
    assert code == 0 and "balanced against the queries in 4 layers" in out, out
    balanced = kvlab.load(tmp_path / "bal")
    window = min(model.cfg.max_seq_len, 1024)
    text = calibration_batches(ByteTokenizer(), 1024, seq_len=window, batch_size=max(1, 4096 // window))
    same = balance_keys(model, text)
    assert balanced.cfg.key_balance and balanced.provenance["steps"][-1]["method"] == "key-balance"
    for k, v in same.state_dict().items():
        torch.testing.assert_close(balanced.state_dict()[k], v)
    code, out, _ = run(capsys, "convert", str(tmp_path / "base"), "--kv-heads", "2", "--balance-keys",
                       "--calibration-tokens", "1024", "-o", str(tmp_path / "gqa"))
    assert code == 0 and "4 -> 2 KV heads" in out
    pooled = kvlab.load(tmp_path / "gqa")
    same = balance_keys(convert(model, n_kv_head=2, method="mean"), text)
    for k, v in same.state_dict().items():
        torch.testing.assert_close(pooled.state_dict()[k], v)
    for extra, message in ((["--mla", "8"], "caches latents"), (["--refit"], "changes no structure")):
        code, _, err = run(capsys, "convert", str(tmp_path / "base"), "--balance-keys", *extra, "-o",
                           str(tmp_path / "x"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


def test_convert_with_refit_equals_the_python_api(capsys, tmp_path):
    """``--refit`` after an MLA conversion: the output projections are refitted as
    ``refit_outputs`` does in Python, and the provenance records the step."""
    model = make_model(n_kv_head=4)
    save_checkpoint(model, tmp_path / "base", tokenizer=ByteTokenizer())
    code, out, _ = run(capsys, "convert", str(tmp_path / "base"), "--mla", "12", "--rope-dim", "8", "--refit",
                       "--calibration-tokens", "1024", "-o", str(tmp_path / "mla"))
    assert code == 0 and "refitted 4 output projections" in out, out
    converted = kvlab.load(tmp_path / "mla")
    step = converted.provenance["steps"][-1]
    assert step["op"] == "refit" and step["calibration_tokens"] == 1024
    from kvlab.convert import convert_to_mla
    from kvlab.convert.refit import refit_outputs
    from kvlab.data.windows import calibration_batches

    calib = calibration_batches(ByteTokenizer(), 1024)
    same = convert_to_mla(model, kv_lora_rank=12, qk_rope_head_dim=8, calibration=calib)
    plain = {k: v.clone() for k, v in same.state_dict().items()}
    refit_outputs(model, same, calib)
    for k, v in same.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v)
    o_proj = "layers.0.self_attn.o_proj.weight"
    assert not torch.equal(plain[o_proj], same.state_dict()[o_proj])


def test_convert_to_lowrank_equals_the_python_api(capsys, tmp_path):
    from kvlab.convert import convert_to_lowrank
    from kvlab.data.windows import calibration_batches

    model = make_model(n_kv_head=2)
    save_checkpoint(model, tmp_path / "base", tokenizer=ByteTokenizer())
    code, out, _ = run(capsys, "convert", str(tmp_path / "base"), "--k-rank", "6", "--v-rank", "14",
                       "--calibration-tokens", "1024", "-o", str(tmp_path / "low"))
    assert code == 0 and "key latent 6 + value latent 14" in out and "512 -> 160" in out, out
    converted = kvlab.load(tmp_path / "low")
    assert (converted.cfg.attn_kind, converted.cfg.attn_options) == ("lowrank", {"k_rank": 6, "v_rank": 14})
    same = convert_to_lowrank(model, k_rank=6, v_rank=14, calibration=calibration_batches(ByteTokenizer(), 1024))
    for k, v in same.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v)


def test_convert_to_lowrank_allocated_by_the_loss_equals_the_python_api(capsys, tmp_path):
    from kvlab.convert import convert_to_lowrank
    from kvlab.data.windows import calibration_batches

    model = make_model(n_kv_head=2)
    save_checkpoint(model, tmp_path / "base", tokenizer=ByteTokenizer())
    code, out, _ = run(capsys, "convert", str(tmp_path / "base"), "--latent-channels", "20",
                       "--calibration-tokens", "1024", "-o", str(tmp_path / "low"))
    assert code == 0 and "(20 per layer on average) (fisher)" in out and "512 -> 160" in out, out
    converted = kvlab.load(tmp_path / "low")
    same = convert_to_lowrank(model, channels=20, calibration=calibration_batches(ByteTokenizer(), 1024))
    assert converted.cfg == same.cfg and converted.cfg.attn_kind == "lowrank"
    for k, v in same.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v)
    code, out, _ = run(capsys, "info", str(tmp_path / "low"))
    assert code == 0 and "per layer (mean" in out and "Low-rank K~" in out, out


def test_kv_quant_in_generate_eval_plan_and_info(capsys, tmp_path):
    from kvlab.config.accounting import cache_bytes
    from kvlab.data.corpus import builtin_corpus
    from kvlab.eval.fidelity import fidelity
    from kvlab.eval.perplexity import evaluate
    from kvlab.eval.plan import max_batch, parse_size

    model = make_model()
    tok = ByteTokenizer()
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok)
    ckpt = str(tmp_path / "ckpt")
    code, out, _ = run(capsys, "generate", ckpt, "--prompt", "hi", "--max-new-tokens", "6", "--no-stop", "--json",
                       "--kv-quant", "int8")
    assert code == 0
    assert json.loads(out)[0]["new_ids"] == generate(model, [tok.encode("hi")], 6, stop_tokens=[], kv_quant="int8")[0]
    code, out, _ = run(capsys, "eval", ckpt, "--seq-len", "32", "--max-tokens", "256", "--json", "--no-progress",
                       "--kv-quant", "int4")
    got = json.loads(out)
    want = evaluate(model, tok, builtin_corpus("validation"), seq_len=32, max_tokens=256, progress=False,
                    kv_quant="int4")
    plain = evaluate(model, tok, builtin_corpus("validation"), seq_len=32, max_tokens=256, progress=False)
    assert got["kv_quant"] == "int4" and got["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert got["perplexity"] != pytest.approx(plain.perplexity, rel=1e-6)
    assert got["kv_bytes_per_token"] == cache_bytes(model.cfg, model.dtype, "int4").per_token
    # --original: the same model's int4 cache against its float cache, on the same tokens (the API's numbers).
    code, out, _ = run(capsys, "eval", ckpt, "--seq-len", "32", "--max-tokens", "256", "--json", "--no-progress",
                       "--kv-quant", "int4", "--original", ckpt)
    got = json.loads(out)["fidelity"]
    want = fidelity(model, model, tok, builtin_corpus("validation"), seq_len=32, max_tokens=256, kv_quant="int4")
    assert got == pytest.approx(want.to_dict(), rel=1e-6) and got["kl"] > 0
    assert got["perplexity_ratio"] == pytest.approx(want.perplexity / plain.perplexity, rel=1e-6)
    code, out, _ = run(capsys, "plan", "--preset", "tiny", "--kv-quant", "int8", "--json", "--memory", "1GiB")
    rows = json.loads(out)["variants"]
    cfg = kvlab.ModelConfig.from_preset("tiny")
    model_row = next(r for r in rows if r["is_model"])
    assert model_row["max_batch"] == max_batch(cfg, parse_size("1GiB"), 4096, "bf16", "int8")
    assert model_row["max_batch_unquantized"] == max_batch(cfg, parse_size("1GiB"), 4096, "bf16")
    code, out, _ = run(capsys, "info", "--preset", "tiny", "--kv-quant", "int4", "--json")
    assert json.loads(out)["kv_bytes_per_token"] == cache_bytes(cfg, "bf16", "int4").per_token

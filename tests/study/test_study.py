"""``kvlab study``: the quick run end to end, every variant and metric checked against closed forms."""

import json
import math

import numpy as np
import pytest

from kvlab import ModelConfig
from kvlab.cli import main
from kvlab.io import save_checkpoint
from kvlab.study.protocol import StudyConfig, study_variants

GiB = 2 ** 30


def _closed_form_kv_bytes(n_kv_head, n_kv_layers, head_dim):
    return 2 * n_kv_layers * n_kv_head * head_dim * 2            # K and V, bf16


def _png_is_a_real_plot(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= 600 and h >= 400
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"{path.name} has {len(colours)} colours: nearly blank"
    assert path.stat().st_size > 20_000


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    assert main(["study", "--quick", "--out", str(out), "--cache-dir", str(out.parent / "cache")]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_study_has_every_model_of_the_protocol(quick_study):
    out, results = quick_study
    cfg = StudyConfig.quick()
    got = {(m["variant"], m["origin"], m["method"], m["alpha"]) for m in results["models"]}
    want = {("MHA", "pretrained", None, None)}
    variants = {"GQA-2": (2, 1), "MQA": (1, 1), "MHA-CLA2": (4, 2), "MQA-CLA2": (1, 2)}
    for v in variants:
        want.add((v, "converted", "mean", 0.0))
        want.add((v, "from scratch", None, None))
        for a in (cfg.mqa_alphas if v == "MQA" else cfg.alphas):
            want.add((v, "uptrained", "mean", a))
    want |= {("MHA", "continued", None, a) for a in {*cfg.alphas, *cfg.mqa_alphas}}     # the control
    for method in ("first", "random"):
        want.add(("MQA", "converted", method, 0.0))
        want |= {("MQA", "uptrained", method, a) for a in cfg.mqa_alphas}
    assert got == want
    assert len(results["models"]) == len(want)


def test_quick_study_metrics_match_closed_forms(quick_study):
    out, results = quick_study
    c = StudyConfig.quick()
    head_dim = c.d_model // c.n_head
    tokens_per_step = c.seq_len * c.batch_size
    decode_by_wiring = {}
    for m in results["models"]:
        n_layers = c.n_layer if "CLA2" not in m["variant"] else c.n_layer // 2
        assert m["n_kv_layers"] == n_layers
        assert m["kv_bytes_per_token"] == _closed_form_kv_bytes(m["n_kv_head"], n_layers, head_dim)
        cfg = ModelConfig.from_preset("tiny", d_model=c.d_model, n_layer=c.n_layer, n_head=c.n_head, d_ff=c.d_ff,
                                      n_kv_head=m["n_kv_head"], cla=1 if n_layers == c.n_layer else 2)
        assert m["params"] == cfg.param_counts()["total"]
        assert m["max_batch"] == (24 * GiB - 2 * m["params"]) // (m["kv_bytes_per_token"] * c.plan_context)
        assert 1 < m["val_ppl"] < 320 and math.isfinite(m["val_bits_per_byte"])
        # bits per byte and perplexity are two views of the same NLL (byte-level: 1 token = 1 byte here).
        assert m["val_bits_per_byte"] == pytest.approx(math.log2(m["val_ppl"]), rel=0.02)
        assert m["val_tokens"] == c.eval_tokens
        assert m["decode_tokens_per_s"] > 0
        decode_by_wiring.setdefault((m["n_kv_head"], n_layers), set()).add(m["decode_tokens_per_s"])
        if m["origin"] in ("uptrained", "continued"):
            steps = math.ceil(m["alpha"] * c.pretrain_tokens / tokens_per_step)
            assert m["uptrain_tokens"] == steps * tokens_per_step
            rows = [json.loads(line) for line in (out / m["metrics"]).read_text().splitlines()]
            assert [r["step"] for r in rows] == list(range(1, steps + 1))
        if m["origin"] in ("pretrained", "from scratch"):
            assert m["train_tokens"] == c.pretrain_tokens
    assert all(len(v) == 1 for v in decode_by_wiring.values())    # one measurement per wiring


def test_quick_study_pareto_flags_are_the_non_dominated_models(quick_study):
    _, results = quick_study
    pts = [(m["kv_bytes_per_token"], m["val_ppl"]) for m in results["models"]]
    for m, (kv, ppl) in zip(results["models"], pts):
        dominated = any((k <= kv and p <= ppl) and (k, p) != (kv, ppl) for k, p in pts)
        assert m["pareto"] == (not dominated)
    assert any(m["pareto"] for m in results["models"])


def test_quick_study_writes_report_and_plots(quick_study):
    out, results = quick_study
    for name in ("pareto.png", "uptraining.png", "loss_curves.png"):
        _png_is_a_real_plot(out / name)
    report = (out / "report.md").read_text()
    for m in results["models"]:
        assert f"| {m['name']} |" in report
    assert "## Reading" in report and "MQA conversion at α=0" in report
    assert (out / "pretrained-mha" / "model.safetensors").is_file()
    assert not list(out.glob("runs/*/checkpoints"))                  # only the pretrained model is kept


def test_study_on_a_given_checkpoint(tmp_path, capsys):
    """The --model path (steps 2 and 4) on a tiny GQA checkpoint with a byte tokenizer."""
    from kvlab.io.tokenizer import ByteTokenizer

    from conftest import make_model

    model = make_model(n_kv_head=2)
    model.tokenizer = ByteTokenizer()
    save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "run"
    assert main(["study", "--quick", "--model", str(tmp_path / "ckpt"), "--out", str(out), "--uptrain-tokens",
                 "256,512", "--cache-dir", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    got = sorted((m["variant"], m["origin"], m["method"], m["uptrain_tokens"]) for m in results["models"])
    want = [("GQA-2", "loaded", None, 0), ("GQA-2", "continued", None, 256), ("GQA-2", "continued", None, 512)]
    for v in ("MQA", "GQA-2-CLA2", "MQA-CLA2"):
        want += [(v, "converted", "mean", 0), (v, "uptrained", "mean", 256), (v, "uptrained", "mean", 512)]
    want += [("MQA", "converted", "first", 0), ("MQA", "converted", "random", 0)]
    assert got == sorted(want)
    for name in ("pareto.png", "uptraining.png", "loss_curves.png", "report.md"):
        assert (out / name).is_file()
    printed = capsys.readouterr().out
    assert "kvlab study" in printed and str(out / "report.md") in printed


def test_study_variants_skip_the_model_itself():
    labels = [v.label for v in study_variants(ModelConfig.from_preset("smollm2-135m"), (4, 2))]
    assert labels == ["MQA", "GQA-3-CLA2", "MQA-CLA2"]
    labels = [v.label for v in study_variants(ModelConfig.from_preset("tiny", n_head=8, n_kv_head=8), (4, 2))]
    assert labels == ["GQA-4", "GQA-2", "MQA", "MHA-CLA2", "MQA-CLA2"]


@pytest.mark.parametrize("argv, needle", [
    (["--gqa-heads", "3"], "gqa_heads=3 must divide n_head=8"),
    (["--alphas", "0"], "alpha=0.0 must be in (0, 1]"),
    (["--n-layer", "1"], "CLA2 needs at least 2 layers"),
    (["--plan-memory", "lots"], "memory size 'lots' is not understood"),
    (["--gqa-heads", "x"], "'x' is not a comma-separated list of head counts"),
    (["--variants", "alibi,warp"], "--variants warp: unknown; choose from alibi, window"),
    (["--seeds", "0"], "seeds=0 must be a positive integer"),
    (["--match-params", "depth"], "invalid choice: 'depth'"),
    (["--model", "x", "--match-params", "ffn"], "--match-params sizes the from-scratch models; it goes without"),
])
def test_study_usage_errors(argv, needle, capsys, tmp_path):
    assert main(["study", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()                              # nothing written


def test_study_refuses_a_non_empty_output_dir(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep me")
    assert main(["study", "--quick", "--out", str(tmp_path / "o")]) == 2
    assert "1 entry kvlab did not write (x)" in capsys.readouterr().err
    assert (tmp_path / "o" / "x").read_text() == "keep me"


def test_study_trains_other_attention_kinds_and_places_them_by_bytes_at_its_context(tmp_path):
    out = tmp_path / "run"
    assert main(["study", "--quick", "--no-from-scratch", "--variants", "alibi,window-sinks,linear", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    entries = {e["name"]: e for e in results["models"]}
    ctx = results["meta"]["config"]["plan_context"]
    d, H, L = 64, 4, 4                                                   # the quick model
    # ALiBi changes no cache; window 32 + 4 sinks keeps 36 of the ctx tokens; linear keeps a state of
    # H x (16 x 16 + 16) float32 per layer — each written out, divided by the context.
    assert entries["alibi-scratch"]["kv_bytes_per_token"] == _closed_form_kv_bytes(H, L, d // H)
    assert entries["window-sinks-scratch"]["kv_bytes_per_token"] == round(
        _closed_form_kv_bytes(H, L, d // H) * 36 / ctx)
    assert entries["linear-scratch"]["kv_bytes_per_token"] == round(L * H * (16 * 16 + 16) * 4 / ctx)
    for name in ("alibi-scratch", "window-sinks-scratch", "linear-scratch"):
        assert entries[name]["origin"] == "from scratch" and math.isfinite(entries[name]["val_ppl"])
    assert entries["linear-scratch"]["variant"] == "Linear-4"


@pytest.mark.parametrize("how", ["ffn", "width"])
@pytest.mark.parametrize("changes", [dict(n_kv_head=1), dict(n_kv_head=2, cla=2),
                                     dict(attn_kind="mla", attn_options=dict(kv_lora_rank=16))])
def test_param_matching_gives_mhas_count_back(how, changes):
    """The widened model's parameter count is the closest its knob can reach to MHA's: one more or one
    fewer unit (d_ff or d_model) would be further away."""
    from kvlab.study.protocol import param_matched

    mha = ModelConfig.from_preset("tiny", d_model=128, n_head=8, d_ff=384)
    small = mha.replace(**changes)
    target = mha.param_counts()["total"]
    assert small.param_counts()["total"] < target
    matched = param_matched(small, target, how)
    got = matched.param_counts()["total"]
    knob = "d_ff" if how == "ffn" else "d_model"
    assert getattr(matched, knob) > getattr(small, knob)
    assert (matched.head_dim, matched.n_head, matched.n_kv_head) == (small.head_dim, small.n_head, small.n_kv_head)
    for step in (-1, 1):
        other = matched.replace(**{knob: getattr(matched, knob) + step}, **(
            {} if how == "ffn" else {"d_ff": max(1, round(small.d_ff * (matched.d_model + step) / small.d_model))}))
        assert abs(got - target) <= abs(other.param_counts()["total"] - target)
    assert abs(got - target) / target < 0.01


def test_study_with_seeds_matched_params_and_the_parallel_block(tmp_path):
    """Two seeds: every model is the mean of its two runs (± their standard deviation), each run kept;
    from-scratch MLA is widened to MHA's parameter count; the parallel block is compared on speed."""
    import statistics

    out = tmp_path / "run"
    assert main(["study", "--quick", "--no-from-scratch", "--variants", "mla,parallel", "--seeds", "2",
                 "--match-params", "ffn", "--pretrain-tokens", "16384", "--mqa-alphas", "0.05", "--eval-tokens",
                 "2048", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--decode-context", "64", "--decode-steps", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    runs, models = results["runs"], results["models"]
    assert len(runs) == 2 * len(models) and {r["seed"] for r in runs} == {0, 1}
    for m in models:
        mine = [r["val_ppl"] for r in runs if r["name"] == m["name"]]
        assert m["n_seeds"] == 2 and m["val_ppl"] == pytest.approx(statistics.fmean(mine))
        assert m["val_ppl_std"] == pytest.approx(statistics.stdev(mine))
    by_name = {m["name"]: m for m in models}
    assert by_name["MHA-pretrained"]["val_ppl_std"] > 0                  # the seeds really differ
    mha, mla = by_name["MHA-pretrained"], by_name["mla-scratch"]
    assert mla["matched"] == "ffn" and abs(mla["params"] - mha["params"]) / mha["params"] < 0.01
    assert by_name["parallel-scratch"]["matched"] is None
    assert by_name["parallel-scratch"]["params"] < mha["params"]          # one norm per block fewer
    assert (out / "runs" / "scratch-parallel-seed1" / "metrics.jsonl").is_file()
    report = (out / "report.md").read_text()
    assert f"{by_name['MHA-pretrained']['val_ppl']:.3f} ± " in report or " ± " in report
    assert "Every training run repeated with 2 seeds" in report
    assert "MHA parallel from scratch: perplexity" in report and "tokens/s" in report
    _png_is_a_real_plot(out / "pareto.png")

"""MLA: the absorbed and expanded forms against a float64 reference, the latent cache's contents and
bytes, and transformers' DeepseekV3ForCausalLM as the independent reference for the weights' meaning."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config

from kvlab import ConfigError, cache_bytes, load
from kvlab.attention.mla import MLAAttention
from kvlab.io.hf import export_hf

from conftest import kind_config, make_model

MLA = dict(attn_kind="mla", attn_options=dict(kv_lora_rank=12, qk_rope_head_dim=6, qk_nope_head_dim=10,
                                             v_head_dim=14))
TOKENS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))


def _set_absorb(model, value):
    for block in model.layers:
        block.self_attn.absorb = value


@pytest.mark.parametrize("variant", [MLA, kind_config(MLA, q_lora_rank=16, latent_norm=False, cla=2)])
def test_absorbed_equals_expanded_equals_float64(variant):
    model = make_model(**variant)
    ref = make_model(**variant).double()
    _set_absorb(ref, False)
    expected = ref(TOKENS, backend="reference")
    for absorb in (False, True):
        _set_absorb(model, absorb)
        torch.testing.assert_close(model(TOKENS).double(), expected, rtol=1e-5, atol=1e-5)


def test_absorbed_decode_reads_only_the_latent_cache():
    """Decode steps never expand the cache: kv_b_proj's module is not called, and what is cached is
    exactly [normalised latent; rotated RoPE key] of each token, computed independently here."""
    model = make_model(**MLA)
    cache = model.new_cache(2, 16)
    model(TOKENS[:, :8], cache=cache)
    calls = []
    hooks = [b.self_attn.kv_b_proj.register_forward_hook(lambda *a: calls.append(1)) for b in model.layers]
    model(TOKENS[:, 8:9], cache=cache)
    for h in hooks:
        h.remove()
    assert calls == []
    attn, x = model.layers[0].self_attn, model.layers[0].input_layernorm(model.embed_tokens(TOKENS[:, :9]))
    c, k_rope = attn.kv_a_proj_with_mqa(x).split([12, 6], dim=-1)
    c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps) * attn.kv_a_layernorm.weight
    pos = torch.arange(9, dtype=torch.float64)
    inv = 1.0 / (model.cfg.rope_theta ** (torch.arange(0, 6, 2, dtype=torch.float64) / 6))
    ang = pos[:, None] * inv[None]
    x1, x2 = k_rope[..., :3].double(), k_rope[..., 3:].double()
    rotated = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    stored = cache.layers[0].entries[:, 0, :9]
    torch.testing.assert_close(stored, torch.cat([c, rotated.float()], -1), rtol=1e-5, atol=1e-5)


def test_ragged_batch_decodes_like_each_row_alone():
    model = make_model(**MLA)
    mask = torch.ones_like(TOKENS)
    mask[1, :4] = 0
    cache = model.new_cache(2, 20)
    out = [model(TOKENS[:, :9], attention_mask=mask[:, :9], cache=cache)[:, -1]]
    out += [model(TOKENS[:, t:t + 1], cache=cache)[:, -1] for t in range(9, 13)]
    alone = model(TOKENS[1:, 4:])
    torch.testing.assert_close(torch.stack(out, 1)[1], alone[0, 4:], rtol=1e-5, atol=1e-5)


def test_cache_bytes_are_latent_plus_rope_key_per_layer():
    cfg = make_model(**MLA).cfg
    assert cache_bytes(cfg, torch.bfloat16).per_token == cfg.n_layer * (12 + 6) * 2
    cla = make_model(**kind_config(MLA, cla=2)).cfg
    assert cache_bytes(cla, torch.bfloat16).per_token == 2 * (12 + 6) * 2


@pytest.mark.parametrize("changes, match", [
    (dict(kv_lora_rank=None), "kv_lora_rank is not set"),
    (dict(qk_rope_head_dim=5), "odd"),
    (dict(pos="learned"), "must be 'rope'"),
])
def test_bad_mla_configs_name_the_fix(changes, match):
    with pytest.raises(ConfigError, match=match):
        make_model(**kind_config(MLA, **changes))


def test_prefix_tuning_is_refused_clearly():
    model = make_model(**MLA)
    with pytest.raises(ConfigError, match="MLA"):
        model.layers[0].self_attn.forward(torch.zeros(1, 2, 64), type("C", (), {"prefix": {0: ()}})())


# --------------------------------------------------------------------------- HF DeepSeek-V3
def _hf_deepseek(**kw):
    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=3,
                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                           max_position_embeddings=128, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():       # non-trivial norms and biases, and larger weights so RoPE matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
            elif "proj" in name:
                p.normal_(0.0, 0.08)
    return model


DEEPSEEK_CASES = {
    "interleaved-q-lora": dict(q_lora_rank=24, rope_interleave=True),
    "half-layout-no-q-lora": dict(q_lora_rank=None, rope_interleave=False),
    "bias-tied": dict(q_lora_rank=24, attention_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", list(DEEPSEEK_CASES))
def test_deepseek_v3_import_matches_transformers(tmp_path, case):
    hf = _hf_deepseek(**DEEPSEEK_CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf")
    assert model.cfg.attn_kind == "mla" and model.cfg.layer_options(0)["kv_lora_rank"] == 16
    with torch.no_grad():
        expected = hf(TOKENS).logits
        torch.testing.assert_close(model(TOKENS), expected, rtol=1e-4, atol=1e-4)
        # Cached decoding (absorbed) against transformers' full forward.
        cache = model.new_cache(2, 16)
        steps = [model(TOKENS[:, :6], cache=cache)] + [model(TOKENS[:, t:t + 1], cache=cache) for t in range(6, 13)]
        torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", [dict(q_lora_rank=None), dict(q_lora_rank=20, qkv_bias=True, o_bias=True),
                                     dict(tie_embeddings=True)])
def test_deepseek_v3_export_loads_in_transformers_with_same_logits(tmp_path, variant):
    model = make_model(**kind_config(MLA, **variant))
    if model.cfg.qkv_bias:
        with torch.no_grad():
            for b in model.layers:
                b.self_attn.kv_a_proj_with_mqa.bias.normal_(0, 0.1)
    export_hf(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, model(TOKENS), rtol=1e-4, atol=1e-4)
    again = load(tmp_path / "hf")
    assert torch.equal(again(TOKENS), model(TOKENS))


@pytest.mark.parametrize("variant", [dict(latent_norm=False), dict(latent_norm=False, q_lora_rank=20, qkv_bias=True,
                                                                   o_bias=True)])
def test_a_norm_free_latent_exports_exactly_with_one_constant_channel(tmp_path, variant):
    """DeepSeek-V3 always normalises the latent; a norm-free one is carried by one more latent
    channel holding a constant, which makes the norm a fixed scale that the weights undo."""
    model = make_model(**kind_config(MLA, **variant))
    with torch.no_grad():
        for b in model.layers:     # latents of very different sizes per token: a norm would change them
            b.self_attn.kv_a_proj_with_mqa.weight.mul_(30)
            b.self_attn.kv_b_proj.weight.div_(30)
    export_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["kv_lora_rank"] == 12 + 1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, model(TOKENS), rtol=1e-4, atol=1e-4)
    again = load(tmp_path / "hf")
    torch.testing.assert_close(again(TOKENS), model(TOKENS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant, match", [(dict(cla=2), "cross-layer"), (dict(sliding_window=4), "sliding window")])
def test_deepseek_v3_export_refuses_what_it_cannot_express(tmp_path, variant, match):
    with pytest.raises(ConfigError, match=match):
        export_hf(make_model(**kind_config(MLA, **variant)), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_moe_deepseek_is_refused_with_the_reason(tmp_path):
    hf = _hf_deepseek(q_lora_rank=None)
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["first_k_dense_replace"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="mixture-of-experts"):
        load(tmp_path / "hf")


def test_mla_module_is_what_the_decoder_builds():
    assert isinstance(make_model(**MLA).layers[1].self_attn, MLAAttention)


def test_plan_and_info_describe_an_mla_model(tmp_path, capsys):
    from kvlab.cli import main
    from kvlab.eval.plan import plan
    from kvlab.io import save_checkpoint

    model = make_model(**MLA)
    rows = plan(model.cfg, memory=2**30, context=100)
    assert [r.variant for r in rows] == ["MLA 12+6", "MLA 12+6-CLA2", "MLA 12+6-CLA3"]
    assert [r.kv_bytes_per_token for r in rows] == [4 * 18 * 2, 2 * 18 * 2, 2 * 18 * 2]
    save_checkpoint(model, tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "[MLA 12+6]" in out and "latent 12 + shared RoPE key 6" in out and "144" in out

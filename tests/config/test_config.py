import json

import pytest

from kvlab import PRESETS, ConfigError, ModelConfig, Transformer, kv_bytes_per_token


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_head=9, n_kv_head=2, d_model=576),
     r"n_head=9 is not divisible by n_kv_head=2; n_kv_head must be one of \[1, 3, 9\]"),
    (dict(n_head=4, n_kv_head=8), "n_kv_head=8 exceeds n_head=4"),
    (dict(d_model=65, n_head=4), "d_model=65 is not divisible by n_head=4; give head_dim"),
    (dict(head_dim=15), "head_dim=15 is odd; RoPE"),
    (dict(n_layer=0), "n_layer=0 must be a positive integer"),
    (dict(vocab_size=-3), "vocab_size=-3 must be a positive integer"),
    (dict(n_head=2.5), r"n_head=2.5 must be an integer"),
    (dict(mlp="tanh"), r"mlp='tanh' is not one of \['swiglu', 'gelu', 'geglu', 'relu'\]"),
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
    (dict(pos="nope"), "pos='nope' is not one of"),
    (dict(block="residual"), "block='residual' is not one of"),
    (dict(norm_eps=0), "norm_eps=0 must be a positive number"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0 must be a positive number"),
    (dict(sliding_window=0), "sliding_window=0 must be a positive integer"),
    (dict(cla=5, n_layer=4), "cla=5 exceeds n_layer=4"),
    (dict(cla=0), "cla=0 must be a positive integer"),
    (dict(cla=2, kv_source=[0, 0, 2, 2]), "both cla=2 and kv_source are set"),
    (dict(kv_source=[0, 0, 2]), "kv_source has 3 entries but n_layer=4"),
    (dict(kv_source=[0, 2, 2, 2]), r"kv_source\[1\]=2: a layer reads KV from itself or an earlier layer"),
    (dict(kv_source=[1, 1, 1, 1]), r"kv_source\[0\]=1"),
    (dict(kv_source=[0, 0, 1, 3]), r"kv_source\[2\]=1 but layer 1 does not produce KV"),
    (dict(attn_backend="magic"), "attn_backend='magic' is not one of"),
    (dict(eos_token_id=999), r"eos_token_id=999 is outside the vocabulary \[0, 320\)"),
    (dict(d_ff=0), "d_ff=0 must be a positive integer"),
])
def test_every_validation_rule(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_preset("tiny", **kwargs)


def test_defaults_resolve():
    cfg = ModelConfig(d_model=128, n_head=8)
    assert (cfg.n_kv_head, cfg.head_dim, cfg.d_ff) == (8, 16, 512)   # MHA, d/H, SwiGLU width rounded to 256
    assert ModelConfig(d_model=128, n_head=8, mlp="gelu").d_ff == 512
    assert ModelConfig(d_model=4096, n_head=32).d_ff == 11008           # Llama-2-7B's width


def test_head_dim_may_differ_from_d_model_over_n_head():
    cfg = ModelConfig.from_preset("tiny", head_dim=32)    # 4 heads x 32 = 128 != d_model 64
    model = Transformer(cfg)
    assert model.layers[0].self_attn.q_proj.weight.shape == (128, 64)
    assert model.param_counts() == cfg.param_counts()


def test_cla_wiring():
    cfg = ModelConfig.from_preset("tiny", n_layer=7, cla=3)
    assert cfg.kv_sources == [0, 0, 0, 3, 3, 3, 6] and cfg.kv_producers == [0, 3, 6] and cfg.n_kv_layers == 3
    assert ModelConfig.from_preset("tiny", n_layer=7, cla=2).kv_sources == [0, 0, 2, 2, 4, 4, 6]
    cfg = ModelConfig.from_preset("tiny", kv_source=[0, 0, 2, 0])
    assert cfg.kv_producers == [0, 2]
    # replace(cla=...) supersedes an explicit kv_source and vice versa.
    assert cfg.replace(cla=2).kv_sources == [0, 0, 2, 2]
    assert cfg.replace(cla=2).replace(kv_source=[0, 1, 1, 1]).kv_producers == [0, 1]


def test_kv_bytes_formula_and_reference_figures():
    assert kv_bytes_per_token(10, 3, 64, "bf16") == 2 * 10 * 3 * 64 * 2
    assert kv_bytes_per_token(1, 1, 1, "fp32") == 8
    # The CLA paper's 1B figures in 16-bit.
    figures = {"cla1b-h128-mha": 163840, "cla1b-h128-mqa": 10240, "cla1b-h128-mqa-cla2": 5120,
               "cla1b-h64-mqa": 5120, "cla1b-h128-gqa4": 40960}
    for name, expected in figures.items():
        assert ModelConfig.from_preset(name).kv_bytes_per_token("fp16") == expected, name
    with pytest.raises(ConfigError, match="unknown dtype 'int4'"):
        ModelConfig().kv_bytes_per_token("int4")


@pytest.mark.parametrize("name, params", [
    ("llama2-7b", 6_738_415_616), ("llama3-8b", 8_030_261_248), ("tinyllama-1.1b", 1_100_048_384),
    ("smollm2-135m", 134_515_008),
])
def test_preset_parameter_counts_match_published_models(name, params):
    assert ModelConfig.from_preset(name).param_counts()["total"] == params


def test_smollm2_shape():
    cfg = ModelConfig.from_preset("smollm2-135m")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size) == \
        (30, 576, 9, 3, 64, 49152)
    assert cfg.tie_embeddings


def test_every_preset_is_valid_and_named():
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert cfg.name == name
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'; choose one of: tiny"):
        ModelConfig.from_preset("gpt5")


def test_json_round_trip_and_errors(tmp_path):
    cfg = ModelConfig.from_preset("tiny", kv_source=[0, 0, 2, 2], qkv_bias=True)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_json(path) == cfg
    path.write_text(json.dumps({"d_model": 64, "n_heads": 4}))
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['n_heads'\]"):
        ModelConfig.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ModelConfig.from_json(path)
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "missing.json")


# ---- kind options: one way for every kind, and configs written before that rule ----
# What kvlab wrote before MLA's and low-rank's settings became kind options: every field at the top
# level, null for models without such a layer.
_OLD_KIND_FIELDS = dict(kv_lora_rank=None, q_lora_rank=None, qk_rope_head_dim=None, qk_nope_head_dim=None,
                        v_head_dim=None, latent_norm=None, k_rank=None, v_rank=None)


def _old_config(**fields):
    new = ModelConfig.from_preset("tiny").to_dict()
    new.pop("attn_options")
    return {**new, **_OLD_KIND_FIELDS, **fields}


@pytest.mark.parametrize("old, options, specs", [
    (_old_config(), None, None),
    (_old_config(attn_kind="mla", kv_lora_rank=12, qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=14,
                 latent_norm=False),
     dict(kv_lora_rank=12, qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=14, latent_norm=False), None),
    (_old_config(attn_kind="lowrank", k_rank=6, v_rank=10), dict(k_rank=6, v_rank=10), None),
    # per-layer widths were always options; a model-wide value fills the specs that lack one
    (_old_config(attn_kind="gqa", k_rank=5, v_rank=7, attention_layers=[{"kind": "lowrank", "k_rank": 3}, "gqa",
                                                                        "lowrank", "gqa"]),
     None, [{"kind": "lowrank", "k_rank": 3, "v_rank": 7}, "gqa", {"kind": "lowrank", "k_rank": 5, "v_rank": 7},
            "gqa"]),
])
def test_configs_with_the_old_kind_fields_load_as_options(old, options, specs):
    cfg = ModelConfig.from_dict(old)
    assert cfg.attn_options == options
    if specs is not None:
        assert cfg.attention_layers == specs
    assert not set(_OLD_KIND_FIELDS) & set(cfg.to_dict())          # written back in the one form only
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_an_old_mla_checkpoint_loads_with_the_same_logits(tmp_path):
    import torch

    import kvlab
    from kvlab.io import save_checkpoint

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", attn_kind="mla", attn_options=dict(kv_lora_rank=12))).eval()
    save_checkpoint(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    shape = config["model"].pop("attn_options")          # as the previous release wrote it: top-level fields
    config["model"].update({**_OLD_KIND_FIELDS, **shape})
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(kvlab.load(tmp_path / "m")(tokens), model(tokens))


def test_kind_options_are_the_kinds_own():
    cfg = ModelConfig.from_preset("tiny", attn_kind="linear", attn_options={"feature": "hedgehog"})
    assert [s.options for s in cfg.layer_specs] == [{"feature": "hedgehog", "decay": "none"}] * 4   # + the default
    # a layer spec's own options override the model-wide ones, for the layers of that kind
    mixed = ModelConfig.from_preset("tiny", attn_kind="linear", attn_options={"feature": "hedgehog"},
                                    attention_layers=[{"kind": "linear", "feature": "elu"}, "linear", "gqa", "gqa"])
    assert [s.options for s in mixed.layer_specs] == [{"feature": "elu", "decay": "none"},
                                                      {"feature": "hedgehog", "decay": "none"}, {}, {}]
    with pytest.raises(ConfigError, match=r"attn_options: attention kind 'linear' has no option\(s\) \['k_rank'\]"):
        ModelConfig.from_preset("tiny", attn_kind="linear", attn_options={"k_rank": 4})
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_dict({**ModelConfig.from_preset("tiny").to_dict(), "kv_lora_rank_typo": 3})


def test_resolved_specs_follow_every_change_of_the_config():
    """layer_specs is resolved once per state of the config: a field set afterwards, or a dict
    changed in place, is never answered from the earlier resolution."""
    cfg = ModelConfig.from_preset("tiny", attn_kind="linear")
    assert cfg.layer_specs[0].options["feature"] == "elu"
    cfg.attn_options = {"feature": "hedgehog"}
    assert cfg.layer_specs[0].options["feature"] == "hedgehog"
    cfg.attn_options["feature"] = "elu"                                   # in place
    assert cfg.layer_specs[0].options["feature"] == "elu"
    mla = ModelConfig.from_preset("tiny", attn_kind="mla", attn_options={"kv_lora_rank": 8})
    assert mla.layer_specs[0].options["v_head_dim"] == 16
    mla.head_dim = 8                                                      # a default that reads another field
    assert mla.layer_specs[0].options["v_head_dim"] == 8

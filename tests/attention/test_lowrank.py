"""The ``lowrank`` kind (Palu): what its cache holds, what it costs, and what it refuses. Its logits
against the float64 reference (tests/naive.py), cached decoding, ragged batches, paging and
quantization run in the kind-generic tests over its registered examples."""

import pytest
import torch

from kvlab import ConfigError, cache_bytes
from kvlab.attention.lowrank import LowRankAttention

from conftest import kind_config, make_model

LOWRANK = dict(attn_kind="lowrank", attn_options=dict(k_rank=6, v_rank=10), qkv_bias=True)
TOKENS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))


def test_the_cache_holds_the_unrotated_key_and_value_latents():
    """Each slot is [k_down·x; v_down·x] of its token, before any rotation (the keys are rotated
    after the rebuild, at every call), computed independently here from the layer's input."""
    model = make_model(**LOWRANK)
    cache = model.new_cache(2, 16)
    model(TOKENS[:, :9], cache=cache)
    model(TOKENS[:, 9:10], cache=cache)
    x = model.layers[0].input_layernorm(model.embed_tokens(TOKENS[:, :10])).double()
    attn = model.layers[0].self_attn
    want = torch.cat([x @ attn.k_down.weight.double().T + attn.k_down.bias.double(),
                      x @ attn.v_down.weight.double().T + attn.v_down.bias.double()], -1)
    torch.testing.assert_close(cache.layers[0].entries[:, 0, :10].double(), want, rtol=1e-5, atol=1e-5)


def test_rebuilt_keys_are_rotated_at_their_positions():
    """The layer's keys equal RoPE(k_up·k_down·x) at positions 0..T-1, in float64 from the
    definition (pair j rotated by pos·θ^(-2j/D))."""
    model = make_model(**LOWRANK)
    attn = model.layers[0].self_attn
    x = torch.randn(1, 7, 64)
    ctx = model.plain_context(torch.zeros(1, 7, dtype=torch.long), torch.float32)
    k, _ = attn.rebuild(attn.latents(x), ctx)
    raw = (attn.k_up(attn.k_down(x))).double().view(1, 7, 2, 16)
    D, pos = 16, torch.arange(7, dtype=torch.float64)
    ang = pos[:, None] * model.cfg.rope_theta ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    a, b = raw[..., :D // 2], raw[..., D // 2:]
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    want = torch.cat([a * c - b * s, b * c + a * s], -1).transpose(1, 2)
    torch.testing.assert_close(k.double(), want, rtol=1e-5, atol=1e-5)


def test_cache_bytes_are_both_latents_per_producer():
    cfg = make_model(**LOWRANK).cfg
    assert cache_bytes(cfg, torch.bfloat16).per_token == cfg.n_layer * (6 + 10) * 2
    cla = make_model(**kind_config(LOWRANK, cla=2)).cfg
    assert cache_bytes(cla, torch.bfloat16).per_token == 2 * (6 + 10) * 2
    assert cache_bytes(cfg, torch.bfloat16, "int8").per_token == cfg.n_layer * (16 + 2)   # one float16 scale


@pytest.mark.parametrize("changes, match", [
    (dict(k_rank=None), "k_rank is not set"),
    (dict(v_rank=0), "v_rank=0 must be a positive integer"),
    (dict(sliding_window=4, attention_sinks=2, sink_positions="cache"), "sink_positions='cache'"),
])
def test_bad_lowrank_configs_name_the_fix(changes, match):
    with pytest.raises(ConfigError, match=match):
        make_model(**kind_config(LOWRANK, **changes))


def test_prefix_tuning_is_refused_clearly():
    model = make_model(**LOWRANK)
    with pytest.raises(ConfigError, match="lowrank"):
        model.layers[0].self_attn.forward(torch.zeros(1, 2, 64), type("C", (), {"prefix": {0: ()}})())


def test_consumers_own_only_queries_and_outputs():
    model = make_model(**kind_config(LOWRANK, cla=2))
    producer, consumer = model.layers[0].self_attn, model.layers[1].self_attn
    assert isinstance(consumer, LowRankAttention)
    assert {n.split(".")[0] for n, _ in producer.named_parameters()} == {"q_proj", "k_down", "v_down", "k_up",
                                                                         "v_up", "o_proj"}
    assert {n.split(".")[0] for n, _ in consumer.named_parameters()} == {"q_proj", "o_proj"}


def test_plan_and_info_describe_a_lowrank_model(tmp_path, capsys):
    from kvlab.cli import main
    from kvlab.eval.plan import plan
    from kvlab.io import save_checkpoint

    model = make_model(**LOWRANK)
    rows = plan(model.cfg, memory=2**30, context=100)
    assert [r.variant for r in rows] == ["Low-rank K6+V10", "Low-rank K6+V10-CLA2", "Low-rank K6+V10-CLA3"]
    assert [r.kv_bytes_per_token for r in rows] == [4 * 16 * 2, 2 * 16 * 2, 2 * 16 * 2]
    save_checkpoint(model, tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "[Low-rank K6+V10]" in out and "key latent of 6 + a value latent of 10" in out and "128" in out

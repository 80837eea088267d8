"""Attention kinds: every registered kind passes the generic contract, and a kind defined here,
in the test file only, gets the same tests by one registration and one line."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from kind_contract import KindContract
from kvlab import ConfigError, ModelConfig, Transformer, cache_bytes
from kvlab.attention import attention
from kvlab.cli import main
from kvlab.config import kv_bytes_per_token
from kvlab.dtypes import dtype_bytes
from kvlab.eval.plan import kv_label, plan
from kvlab.layers.rope import apply_rope
from kvlab.peft.prefix import PromptConfig, add_prompt_adapter
from kvlab.registry import KINDS, AttentionKind, CacheBytes, Capabilities, get_kind, register_kind

# ---- every registered kind (the built-in ones, at collection time) gets the contract ----
for _name in list(KINDS):
    globals()[f"TestRegisteredKind_{_name}"] = type(f"TestRegisteredKind_{_name}", (KindContract,), {"kind": _name})


# ---- a throwaway kind: K and V are one projection (K = V), so the cache holds one tensor ----
class SharedKVLayer:
    """A cache layer of one buffer per layer, ``(B, n_kv_head, max_len, head_dim)``."""

    def __init__(self, batch, heads, max_len, dim, dtype, device):
        self.kv = torch.zeros(batch, heads, max_len, dim, dtype=dtype, device=device)

    @property
    def nbytes(self):
        return self.kv.numel() * self.kv.element_size()

    def update(self, kv, *, step):
        if step.uniform_start is not None:
            self.kv[:, :, step.uniform_start:step.uniform_start + kv.shape[2]] = kv
        else:
            rows, toks, slots = step.write_index
            self.kv[rows, :, slots] = kv[rows, :, toks].to(self.kv.dtype)
        return (self.kv[:, :, :step.k_len],)

    def write_prefix(self, kv):
        self.kv[:, :, :kv.shape[2]] = kv


class SharedKVAttention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        D = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, D).transpose(1, 2)
        kv = self.kv_proj(x).view(B, T, -1, D).transpose(1, 2)
        if self.cfg.pos == "rope":
            q, kv = apply_rope(q, ctx.cos, ctx.sin), apply_rope(kv, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            (kv,) = ctx.cache.update(self.layer, kv, step=ctx.step)
        out = attention(q, kv, kv.to(q.dtype), ctx.mask(self.cfg.layer_window(self.layer)), backend=ctx.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def _validate(cfg, layer, options):
    if cfg.kv_sources[layer] != layer:
        raise ConfigError(f"layer {layer}: the shared-kv kind does not share its cache across layers")


SHARED_KV = AttentionKind(
    name="shared-kv-test", module=SharedKVAttention,
    cache_layer=lambda cfg, i, B, L, dtype, device: SharedKVLayer(B, cfg.n_kv_head, L, cfg.head_dim, dtype, device),
    cache_bytes=lambda cfg, i, dtype: CacheBytes(per_token=cfg.n_kv_head * cfg.head_dim * dtype_bytes(dtype)),
    param_count=lambda cfg, i: cfg.d_model * (2 * cfg.n_head + cfg.n_kv_head) * cfg.head_dim,
    options=("window",), validate=_validate,
    examples={"shared-kv": dict(n_kv_head=2, attn_kind="shared-kv-test"),
              "shared-kv-hybrid": dict(n_kv_head=1, attention_layers=[
                  "shared-kv-test", {"kind": "gqa", "window": 4}, "shared-kv-test", "gqa"])})


@pytest.fixture(scope="module", autouse=True)
def _unregister_after_module():
    yield
    KINDS.pop(SHARED_KV.name, None)


register_kind(SHARED_KV)


class TestThrowawayKind(KindContract):   # the whole cost of testing a new kind
    kind = "shared-kv-test"


def test_the_throwaway_kind_is_accounted_for_by_the_one_function():
    cfg = ModelConfig.from_preset("tiny", n_kv_head=1, attention_layers=[
        "shared-kv-test", {"kind": "gqa", "window": 4}, "shared-kv-test", "gqa"])
    kv = kv_bytes_per_token(1, 1, 16, "bf16")
    per_token = 2 * 1 * 16 * 2 + kv                        # one tensor vs K and V (the global gqa layer)
    # The windowed gqa layer keeps a rolling cache: its bytes stop growing at its window.
    assert cache_bytes(cfg, "bf16") == CacheBytes(per_token=per_token, bounded=((kv, 4),))
    assert cfg.kv_bytes_per_token("bf16") == per_token
    # It declares no quantizable cache (and its cache_bytes takes no kv_quant): a quantized cache is refused
    # in one line, not a TypeError.
    with pytest.raises(ConfigError, match="'shared-kv-test' does not count quantized caches"):
        cache_bytes(cfg, "bf16", "int8")


# ---- a kind that declares nothing is named, described and refused correctly everywhere ----
HYBRID = dict(n_kv_head=1, attention_layers=["shared-kv-test", {"kind": "gqa", "window": 4}, "shared-kv-test", "gqa"])


def test_the_throwaway_kind_is_labelled_by_its_name_in_plans():
    register_kind(SHARED_KV)
    alone = ModelConfig.from_preset("tiny", n_kv_head=2, attn_kind="shared-kv-test")
    assert kv_label(alone) == "shared-kv-test"
    # Its cache does not say it holds KV heads, and it refuses CLA: the plan has the model alone.
    assert [r.variant for r in plan(alone, 2**30, 64)] == ["shared-kv-test"]
    hybrid = ModelConfig.from_preset("tiny", **HYBRID)
    assert kv_label(hybrid) == "MQA+shared-kv-test"        # kinds in registration order, each its own label


def test_info_describes_each_kind_of_a_hybrid(capsys, tmp_path):
    register_kind(SHARED_KV)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ModelConfig.from_preset("tiny", **HYBRID).to_dict()))
    assert main(["info", "--config", str(path)]) == 0
    heads = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("heads"))
    assert "gqa layers: 4 query, 1 KV (group 4), head_dim 16" in heads
    assert "shared-kv-test layers: 4 query, 1 KV (group 4), head_dim 16" in heads


def test_features_that_need_a_capability_refuse_the_kind_in_one_line():
    register_kind(SHARED_KV)
    model = Transformer(ModelConfig.from_preset("tiny", **HYBRID))
    with pytest.raises(ConfigError, match=r"prefix tuning writes K/V prefixes, which layers of kind\(s\) "
                                          r"\['shared-kv-test'\] do not keep"):
        add_prompt_adapter(model, PromptConfig(method="prefix", num_virtual_tokens=2))
    add_prompt_adapter(Transformer(model.cfg), PromptConfig(method="prompt", num_virtual_tokens=2))   # no K/V
    with pytest.raises(ConfigError, match="'shared-kv-test' does not count quantized caches"):
        model.new_cache(1, 8, kv_quant="int8")
    with pytest.raises(ConfigError, match=r"attn_scale applies to softmax \(gqa\) layers; this model has "
                                          r"\['shared-kv-test'\]"):
        ModelConfig.from_preset("tiny", **HYBRID, attn_scale=1.0)
    with pytest.raises(ConfigError, match=r"\['shared-kv-test'\] layers are not supported there"):
        ModelConfig.from_preset("tiny", **HYBRID, n_encoder_layer=2, pos="t5")


def test_declared_capabilities_are_what_the_features_read():
    """The same kind, declaring what it can do, is accepted where it was refused."""
    able = dataclasses.replace(SHARED_KV, name="shared-kv-able", capabilities=Capabilities(softmax_scores=True),
                               label=lambda cfg, layers: f"SKV-{cfg.n_kv_head}")
    register_kind(able)
    try:
        cfg = ModelConfig.from_preset("tiny", n_kv_head=2, attn_kind="shared-kv-able", attn_scale=1.0)
        assert kv_label(cfg) == "SKV-2"
    finally:
        KINDS.pop(able.name)


# ---- specs and their validation ----
def test_layer_specs_resolve_flat_and_per_layer_forms():
    flat = ModelConfig.from_preset("tiny")
    assert [s.kind for s in flat.layer_specs] == ["gqa"] * 4
    mixed = ModelConfig.from_preset("tiny", attention_layers=[{"kind": "gqa", "window": 8}, "gqa", "gqa", "gqa"])
    assert mixed.layer_window(0) == 8 and mixed.layer_window(1) is None
    assert ModelConfig.from_dict(mixed.to_dict()) == mixed


@pytest.mark.parametrize("overrides, match", [
    (dict(attn_kind="nope"), "unknown attention kind 'nope'"),
    (dict(attention_layers=["gqa"] * 3), "attention_layers has 3 entries but n_layer=4"),
    (dict(attention_layers=["gqa", 7, "gqa", "gqa"]), r"attention_layers\[1\]=7 is not a kind name"),
    (dict(attention_layers=[{"kind": "gqa", "size": 2}, "gqa", "gqa", "gqa"]), r"has no option\(s\) \['size'\]"),
    (dict(attention_layers=[{"kind": "gqa", "window": 0}, "gqa", "gqa", "gqa"]), "window=0 must be a positive"),
])
def test_bad_specs_are_refused_with_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_preset("tiny", **overrides)


def test_a_layer_shares_kv_only_with_its_own_kind():
    register_kind(SHARED_KV)
    with pytest.raises(ConfigError, match="can share KV only with a layer of its kind"):
        ModelConfig.from_preset("tiny", kv_source=[0, 0, 2, 2],
                                attention_layers=["gqa", "shared-kv-test", "gqa", "gqa"])


def test_registering_a_second_kind_under_a_taken_name_is_refused():
    gqa = get_kind("gqa")
    with pytest.raises(ConfigError, match="registered already"):
        register_kind(AttentionKind("gqa", gqa.module, gqa.cache_layer, gqa.cache_bytes, gqa.param_count))

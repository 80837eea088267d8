"""Trainable sets are unions of declared parameter groups (kvlab.training.groups).

The groups replaced a rule over substrings of parameter names. That rule is kept here, verbatim, as
the oracle: on every registered kind's example config, on encoder–decoders, with and without
adapters and a score head, every mode selects exactly the parameters it selected before (and
leaves the same ``requires_grad`` flags behind)."""

from __future__ import annotations

import copy

import pytest
import torch

from kvlab import ConfigError, EncoderDecoder, ModelConfig
from kvlab.models.heads import add_score_head
from kvlab.peft import AdapterSpec, attach, merge_prompt_reparameterization
from kvlab.peft.lora import ALL_LINEAR_TARGETS
from kvlab.training import TRAIN_ONLY, parameter_groups, trainable_parameters
from kvlab.training.groups import checkpoints_hold_adapter_only

from conftest import VARIANTS, make_model


def legacy_trainable(model, train_only: str) -> list[str]:
    """The substring rule that ``trainable_parameters`` followed before the groups existed."""
    def is_adapter_parameter(name: str) -> bool:
        return ".lora_" in name or name.startswith(("prompt_adapter.", "score."))

    chosen = []
    for name, p in model.named_parameters():
        if name.startswith("score."):
            keep = True
        elif is_adapter_parameter(name) and train_only in ("adapter", "attention+adapter"):
            keep = p.requires_grad if name.startswith("prompt_adapter.") else True
        else:
            keep = not is_adapter_parameter(name) and (
                train_only == "all" or (train_only in ("attention", "attention+adapter") and "_attn." in name)
                or (train_only == "kv" and (".k_proj." in name or ".v_proj." in name)
                    and not name.startswith("encoder.")))
        p.requires_grad_(keep)
        if keep:
            chosen.append(name)
    if not chosen:
        raise ConfigError(f"train_only={train_only!r} selects no parameters of this model")
    return chosen


def _selection(select, model, mode):
    """(names selected or the error, requires_grad of every parameter after)."""
    try:
        names = select(model, mode)
    except ConfigError as e:
        names = str(e)
    return names, {n: p.requires_grad for n, p in model.named_parameters()}


def assert_same_selection(model, modes=TRAIN_ONLY):
    for mode in modes:
        old, new = copy.deepcopy(model), copy.deepcopy(model)
        want = _selection(legacy_trainable, old, mode)
        got = _selection(lambda m, t: [n for n, _ in trainable_parameters(m, t)], new, mode)
        assert got == want, mode


def _adapted(model, setup: str):
    if setup == "score+lora":
        add_score_head(model, seed=0)
        attach(model, AdapterSpec("lora", {"r": 2, "target_modules": list(ALL_LINEAR_TARGETS)}))
    elif setup == "adalora":
        attach(model, AdapterSpec("adalora", {"init_r": 3, "target_r": 2, "total_steps": 10}))
    elif setup == "prompt":
        attach(model, AdapterSpec("prompt", {"num_virtual_tokens": 2}))
    elif setup == "prefix-merged":
        attach(model, AdapterSpec("prefix", {"num_virtual_tokens": 2, "reparam_hidden": 4}))
        merge_prompt_reparameterization(model)
    return model


def _gqa_only(overrides) -> bool:
    return {s.kind for s in ModelConfig.from_preset("tiny", **overrides).layer_specs} == {"gqa"}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("setup", ["plain", "score+lora", "prompt"])
def test_every_kind_selects_what_the_substring_rule_selected(variant, setup):
    assert_same_selection(_adapted(make_model(**VARIANTS[variant]), setup))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if _gqa_only(VARIANTS[v])][:4])
@pytest.mark.parametrize("setup", ["adalora", "prefix-merged"])
def test_other_adapters_select_what_the_substring_rule_selected(variant, setup):
    assert_same_selection(_adapted(make_model(**VARIANTS[variant]), setup))


@pytest.mark.parametrize("overrides", [{}, {"cross_n_kv_head": 1, "cross_cla": 2}, {"n_kv_head": 2, "cla": 2}])
@pytest.mark.parametrize("lora", [False, True])
def test_an_encoder_decoder_selects_what_the_substring_rule_selected(overrides, lora):
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig.from_preset("t5-tiny", **overrides))
    if lora:
        attach(model, AdapterSpec("lora", {"r": 2, "target_modules": list(ALL_LINEAR_TARGETS)}))
    assert_same_selection(model)


def test_the_groups_of_an_encoder_decoder():
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig.from_preset("t5-tiny"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {k: {names[id(p)] for p in v} for k, v in parameter_groups(model).items()}
    assert any(n.startswith("encoder.layers.0.self_attn.") for n in groups["attention"])
    assert any(n.startswith("layers.0.cross_attn.") for n in groups["attention"])
    assert "layers.0.cross_attn.k_proj.weight" in groups["kv"]       # cross-attention K/V are cached too
    assert not any(n.startswith("encoder.") for n in groups["kv"])   # the encoder's are never cached
    assert groups["score"] == groups["adapter"] == set()
    assert groups["model"] == set(names.values())


def test_a_kind_without_k_and_v_projections_has_no_kv_group():
    # MLA keeps a latent, low-rank K/V factors: neither has k_proj/v_proj for "kv" to train.
    for variant in ("mla", "lowrank"):
        with pytest.raises(ConfigError, match="train_only='kv' selects no parameters"):
            trainable_parameters(make_model(**VARIANTS[variant]), "kv")


def test_adapter_modes_checkpoint_the_adapter_alone():
    assert [m for m in TRAIN_ONLY if checkpoints_hold_adapter_only(m)] == ["adapter"]


def test_an_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="train_only='mlp' is not one of"):
        trainable_parameters(make_model(), "mlp")

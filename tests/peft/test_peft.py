"""PEFT on every attention variant: counts, gradients, training, save/load, merge, prefixes in the
KV cache, NF4, AdaLoRA's schedule, PEFT export checked by ``peft`` itself."""

import json

import pytest
import torch

from kvlab.data.chat import ChatBatches
from kvlab.errors import CheckpointError, ConfigError
from kvlab.io import save_checkpoint
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.peft import (
    AdapterSpec,
    adapter_parameters,
    attach,
    export_peft,
    load_adapter,
    lora_layers,
    merge_and_unload,
    parameter_count,
    save_adapter,
)
from kvlab.peft.adalora import AdaLoraConfig, orthogonality_penalty
from kvlab.peft.lora import LoraConfig
from kvlab.training import TrainConfig, evaluate_loss, train, trainable_parameters

from conftest import make_model

# Virtual tokens on the sliding-window variant warn by design (tested where it matters).
pytestmark = pytest.mark.filterwarnings("ignore:.*tuning on a model with sliding_window")

# The attention variants PEFT must handle: KV heads fewer than query heads, and layers without K/V.
PEFT_VARIANTS = {
    "mha": dict(n_kv_head=4),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "cla2": dict(n_kv_head=2, cla=2),
    "mqa-cla2": dict(n_kv_head=1, cla=2),
    "kv-source": dict(n_kv_head=2, n_layer=5, kv_source=[0, 0, 2, 0, 4]),
    "parallel": dict(n_kv_head=2, block="parallel"),
    "learned-pos": dict(n_kv_head=2, pos="learned"),
    "sliding-window": dict(n_kv_head=2, sliding_window=5),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {
    "lora": AdapterSpec("lora", dict(r=4, alpha=8.0, target_modules=ALL_LINEAR)),
    "lora-attn-rslora": AdapterSpec("lora", dict(r=3, alpha=6.0, rslora=True)),
    "adalora": AdapterSpec("adalora", dict(init_r=6, target_r=3, total_steps=20)),
    "prefix": AdapterSpec("prefix", dict(num_virtual_tokens=5, reparam_hidden=32)),
    "ptuning": AdapterSpec("ptuning", dict(num_virtual_tokens=5)),
    "prompt": AdapterSpec("prompt", dict(num_virtual_tokens=5)),
}
# Tiny models quantize too: their block counts take scale groups of 16 to 64 blocks.
NF4_SHAPE = dict()


def conversations(n=24, seed=0):
    from kvlab.data.instruct import make_tasks

    return make_tasks(n, seed)


def perturb(model):
    """Give zero-initialised adapter parts (LoRA B, the prefix MLP's last layer) random values,
    so that tests see a non-trivial adapter."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def closed_form(model_cfg, spec):
    """The trainable-parameter count written out per method from the config alone."""
    c = model_cfg
    P = spec.options.get("num_virtual_tokens")
    kv_width = len(c.kv_producers) * 2 * c.n_kv_head * c.head_dim
    if spec.method == "prompt":
        return P * c.d_model
    if spec.method == "ptuning":
        return P * kv_width
    if spec.method == "prefix":
        h = spec.options["reparam_hidden"]
        return P * c.d_model + c.d_model * h + h + h * kv_width + kv_width
    targets = spec.options.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    r = spec.options.get("r") or spec.options["init_r"]
    d, q, kv, ff = c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.d_ff
    per = {"q_proj": d + q, "o_proj": q + d, "gate_proj": d + ff, "up_proj": d + ff, "down_proj": ff + d}
    kv_per = {"k_proj": d + kv, "v_proj": d + kv}
    extra = 1 if spec.method == "adalora" else 0      # AdaLoRA's singular values: r per layer
    total = c.n_layer * sum(r * (per[t] + extra) for t in targets if t in per)
    total += len(c.kv_producers) * sum(r * (kv_per[t] + extra) for t in targets if t in kv_per)
    return total


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_counts_gradients_and_exact_reload(tmp_path, variant, spec_name):
    spec = SPECS[spec_name]
    model = make_model(**PEFT_VARIANTS[variant])
    attach(model, spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == closed_form(model.cfg, spec)
    assert parameter_count(model.cfg, spec) == closed_form(model.cfg, spec)
    assert trainable == {n for n, _ in trainable_parameters(model, "adapter")}
    if spec.method in ("prefix", "ptuning"):     # K/V prefixes: n_kv_head heads, producers only
        t = model.prompt_adapter.tensor()
        assert t.shape == (len(model.cfg.kv_producers), 2, model.cfg.n_kv_head, 5, model.cfg.head_dim)
        assert model.prompt_adapter.producers == model.cfg.kv_producers

    perturb(model)
    x = torch.randint(0, 256, (2, 11))
    model(x).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name

    model.eval()
    expected = model(x)
    save_adapter(model, tmp_path / "adapter")
    fresh = make_model(**PEFT_VARIANTS[variant])
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh.eval()(x), expected)


# Learning rates: prompt tuning trains a few embeddings and wants a large one (Lester et al. use
# 0.3); P-tuning v2's raw prefixes also take a larger step than the reparameterised ones.
SFT_LR = {"prompt": 0.3, "ptuning": 0.1}
# The drop each method must show on the fixed held-out batch (deterministic, so any drop is real
# learning): virtual tokens move an untrained model least, LoRA on every projection the most.
SFT_MIN_DROP = {"lora": 0.2, "adalora": 0.2, "prefix": 0.03, "ptuning": 0.02, "prompt": 0.005}


@pytest.mark.parametrize("spec_name", ["lora", "adalora", "prefix", "ptuning", "prompt"])
@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_short_sft_run_lowers_loss(tmp_path, variant, spec_name):
    torch.manual_seed(0)
    spec = SPECS[spec_name]
    overrides = dict(PEFT_VARIANTS[variant])
    if overrides.get("sliding_window") and spec.method in ("prefix", "ptuning", "prompt"):
        # A 5-token window keeps virtual tokens out of reach of every answer (see
        # test_virtual_tokens_fall_out_of_the_sliding_window); a wider one lets them steer.
        overrides["sliding_window"] = 48
    model = make_model(**overrides)
    attached = attach(model, spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batches = ChatBatches(conversations(), ByteTokenizer(), seq_len=96, batch_size=8)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=20, batch_size=8, seq_len=96,
                      lr=SFT_LR.get(spec.method, 1e-2), warmup_steps=2,
                      weight_decay=0.0, save_every=20, log_every=100, train_only="adapter")
    held_out = ChatBatches(conversations(16, seed=1), ByteTokenizer(), seq_len=96, batch_size=8)
    before_loss = evaluate_loss(model, held_out, 2, "cpu")
    train(model, batches, None, cfg, quiet=True, hooks=attached.allocator)
    # Loss on the same held-out conversations (assistant tokens only): no batch-to-batch noise.
    after_loss = evaluate_loss(model, held_out, 2, "cpu")
    assert after_loss < before_loss - SFT_MIN_DROP[spec.method], (before_loss, after_loss)
    for n, p in model.named_parameters():                 # the base never moved
        if n in before:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("method", ["prefix", "ptuning", "prompt"])
def test_virtual_tokens_fall_out_of_the_sliding_window(method):
    """Closed form of a sliding window's reach: with L layers of window W, the token at index t
    (position P + t) is influenced by the virtual tokens iff t < L*(W-1). Two different adapters
    must therefore give identical logits from index L*(W-1) on and different ones before it."""
    W = 5
    logits = []
    for seed in (1, 2):
        model = make_model(n_kv_head=2, sliding_window=W)
        with pytest.warns(UserWarning, match=f"from index {model.cfg.n_layer * (W - 1)} on"):
            attach(model, AdapterSpec(method, dict(num_virtual_tokens=3, reparam_hidden=16)))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in adapter_parameters(model):
                p.add_(torch.randn(p.shape, generator=gen))
        torch.manual_seed(0)
        logits.append(model(torch.randint(0, 256, (2, 24))))
    reach = model.cfg.n_layer * (W - 1)
    assert reach < 24
    diff = (logits[0] - logits[1]).abs().amax(dim=(0, 2))
    assert diff[reach:].max() == 0, diff
    assert (diff[:reach] > 0).all(), diff


@pytest.mark.parametrize("spec_name", ["lora", "lora-attn-rslora", "adalora"])
@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_lora_merge_matches_unmerged(tmp_path, variant, spec_name):
    model = make_model(**PEFT_VARIANTS[variant])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    attach(model, SPECS[spec_name])
    perturb(model)
    x = torch.randint(0, 256, (2, 9))
    unmerged = model(x)
    for layer in lora_layers(model).values():
        layer.merge()
    assert (model(x) - unmerged).abs().max() < 1e-5
    for layer in lora_layers(model).values():
        layer.unmerge()
    for k, v in base_state.items():                      # unmerge restores the base weights
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
    with pytest.raises(ConfigError, match="adapter attached"):
        save_checkpoint(model, tmp_path / "ckpt")
    merged = merge_and_unload(model)
    assert not lora_layers(merged)
    save_checkpoint(merged, tmp_path / "ckpt")                       # a plain checkpoint again
    assert (merged(x) - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["prefix", "ptuning", "prompt"])
@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_virtual_tokens_equal_the_tokens_they_start_from(variant, method):
    """Independent reference: at initialisation the virtual tokens are sampled vocabulary tokens
    (their embeddings, or the base model's K/V for them), so the adapted model's logits on x equal
    the base model's on [those tokens] + x, last len(x) positions."""
    from kvlab.peft.prefix import _sampled_tokens

    model = make_model(**PEFT_VARIANTS[variant])
    x = torch.randint(0, 256, (3, 8))
    spec = AdapterSpec(method, dict(num_virtual_tokens=4, **({"reparam_hidden": 16} if method == "prefix" else {})))
    ids = _sampled_tokens(model, 4, spec.config.init_seed)
    reference = model(torch.cat([ids.expand(3, -1), x], 1))[:, 4:]
    attach(model, spec)
    assert (model(x) - reference).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["prefix", "ptuning", "prompt"])
@pytest.mark.parametrize("variant", ["gqa", "cla2", "mqa-cla2"])
def test_cached_decoding_equals_full_forward_with_prefix(variant, method):
    from kvlab.inference.generation import generate

    model = make_model(**PEFT_VARIANTS[variant])
    attach(model, AdapterSpec(method, dict(num_virtual_tokens=3)))
    perturb(model)
    x = torch.randint(0, 256, (2, 10))
    full = model(x)
    cache = model.new_cache(2, model.n_virtual_tokens + 10)
    if method != "prompt":      # the prefix lives in the cache: P slots, n_kv_head heads
        steps = [model(x[:, :4], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(4, 10)]
        p = model.cfg.kv_producers[0]
        assert cache.keys[p].shape[1] == model.cfg.n_kv_head
        assert torch.allclose(cache.keys[p][:, :, :3], model.prompt_adapter.per_layer(2)[p][0])
    else:
        steps = [model(x[:, :4], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(4, 10)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
    # A left-padded batch generates what each prompt generates alone.
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    together = generate(model, prompts, 6, stop_tokens=[])
    alone = [generate(model, [p], 6, stop_tokens=[])[0] for p in prompts]
    assert together == alone


def test_prefix_merge_removes_the_mlp_and_keeps_the_function(tmp_path):
    model = make_model(n_kv_head=2, cla=2)
    attach(model, SPECS["prefix"])
    perturb(model)
    x = torch.randint(0, 256, (2, 7))
    before = model(x)
    model.prompt_adapter.merge()
    assert not model.prompt_adapter.reparameterized and not hasattr(model.prompt_adapter, "mlp")
    assert (model(x) - before).abs().max() < 1e-6
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "kvlab_adapter.json").read_text())["prefix_merged"] is True
    fresh = make_model(n_kv_head=2, cla=2)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(x), model(x))


# ------------------------------------------------------------------------------------- NF4
@pytest.mark.parametrize("shape, group", [((256, 256), 256), ((576, 576), 64), ((192, 576), 64)])
def test_nf4_error_matches_the_codebook_expectation(shape, group):
    from kvlab.peft.nf4 import _to_nf4, dequantize, nf4_codebook, scaler_block_size

    to_nf4 = _to_nf4()
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert scaler_block_size(w) == group       # 256 blocks per scale group where the size allows (SmolLM2: 64)
    q = to_nf4(w, 64, group)
    levels = nf4_codebook(q).double()
    # The expectation, in float64 from the codebook: each block of 64 scaled by its absmax, each
    # weight rounded to the nearest level (exact scales; torchao's scales are 8-bit, so slightly off).
    blocks = w.double().reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    nearest = levels[((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1)]
    expected_err = (nearest * absmax - blocks).abs().mean()
    err = (dequantize(q).double().reshape(-1, 64) - blocks).abs().mean()
    assert abs(err / expected_err - 1) < 0.05, (float(err), float(expected_err))
    # No weight is further from its value than half the widest gap between levels (plus scale error).
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    assert ((dequantize(q).double().reshape(-1, 64) - blocks).abs() <= absmax * half_gap * 1.02 + 1e-3).all()


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "cla2", "mqa-cla2", "kv-source"])
def test_qlora_memory_forward_and_training(tmp_path, variant):
    torch.manual_seed(0)
    model = make_model(**NF4_SHAPE, **PEFT_VARIANTS[variant])
    x = torch.randint(0, 256, (2, 9))
    full_precision = model(x)
    spec = AdapterSpec("qlora", dict(r=4, alpha=8.0, target_modules=ALL_LINEAR))
    attached = attach(model, spec, compute_dtype=torch.float32)
    mem = attached.memory
    assert mem["quantized_layers"] == mem["linear_layers"] > 0
    assert mem["nf4_bytes"] <= 0.30 * mem["bf16_bytes"]
    assert sum(p.numel() for _, p in adapter_parameters(model)) == closed_form(model.cfg, SPECS["lora"])
    # The forward computes with exactly the dequantized 4-bit weights: the same model with those
    # weights written in fp32 (and no adapter: B = 0) is the reference.
    from kvlab.peft.nf4 import dequantize

    reference = make_model(**NF4_SHAPE, **PEFT_VARIANTS[variant])
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            reference.get_submodule(name).weight.copy_(dequantize(layer.weight))
    out = model(x)
    assert (out - reference(x)).abs().max() < 1e-5
    assert (out - full_precision).abs().max() > 1e-3          # and they are not the full-precision weights
    batches = ChatBatches(conversations(), ByteTokenizer(), seq_len=96, batch_size=8)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=8, batch_size=8, seq_len=96, lr=1e-2, warmup_steps=2,
                      weight_decay=0.0, save_every=8, log_every=100, train_only="adapter")
    held_out = ChatBatches(conversations(8, seed=1), ByteTokenizer(), seq_len=96, batch_size=8)
    before_loss = evaluate_loss(model, held_out, 1, "cpu")
    train(model, batches, None, cfg, quiet=True)
    assert evaluate_loss(model, held_out, 1, "cpu") < before_loss - 0.2
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == \
        closed_form(model.cfg, SPECS["lora"])       # only the adapter trained
    save_adapter(model, tmp_path / "adapter")
    fresh = make_model(**NF4_SHAPE, **PEFT_VARIANTS[variant])
    load_adapter(fresh, tmp_path / "adapter", compute_dtype=torch.float32)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ConfigError, match="4-bit"):
        next(iter(lora_layers(model).values())).merge()


def test_qlora_refuses_a_model_with_nothing_quantizable():
    # 72 x 72 = 81 blocks of 64, 72 x 36 and 72 x 136 no whole number of blocks in groups of 8.
    with pytest.raises(ConfigError, match="divisible by 512"):
        attach(make_model(d_model=72, d_ff=136), AdapterSpec("qlora", {}), compute_dtype=torch.float32)


# ---------------------------------------------------------------------------------- AdaLoRA
def test_adalora_budget_schedule_and_final_ranks(tmp_path):
    cfg = AdaLoraConfig(init_r=6, target_r=2, total_steps=40, init_warmup=5, final_warmup=10, mask_interval=5)
    model = make_model(n_kv_head=2)
    attached = attach(model, AdapterSpec("adalora", cfg.to_dict()))
    alloc = attached.allocator
    n = len(alloc.layers)
    assert alloc.budget_at(5) == (6 * n, False)
    # Cubic decay between steps 5 and 30: budget = target + (init - target)·(1 - progress)³.
    for step in (10, 15, 20, 25):
        progress = (step - 5) / 25
        assert alloc.budget_at(step) == (int(4 * n * (1 - progress) ** 3 + 2 * n), True)
    assert alloc.budget_at(31) == (2 * n, True)
    batches = ChatBatches(conversations(), ByteTokenizer(), seq_len=96, batch_size=8)
    tc = TrainConfig(out_dir=str(tmp_path), max_steps=40, batch_size=8, seq_len=96, lr=1e-2, warmup_steps=2,
                     weight_decay=0.0, save_every=40, log_every=100, train_only="adapter")
    penalty_before = float(orthogonality_penalty(model).detach())
    train(model, batches, None, tc, quiet=True, hooks=alloc)
    ranks = alloc.ranks()
    assert sum(ranks.values()) <= 2 * n         # the target budget (ties may prune more)
    assert sum(ranks.values()) >= 2 * n - 2
    assert float(orthogonality_penalty(model).detach()) < penalty_before   # the regulariser pulls P, Q to orthonormal


def test_adalora_config_errors():
    with pytest.raises(ConfigError, match="target_r=9 exceeds init_r=4"):
        AdaLoraConfig(init_r=4, target_r=9)
    with pytest.raises(ConfigError, match="below total_steps"):
        AdaLoraConfig(total_steps=10, init_warmup=5, final_warmup=5)


# ------------------------------------------------------------------------------- PEFT export
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_peft_export_loads_in_peft_with_the_same_logits(tmp_path, method):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from kvlab.io.hf import export_hf
    from peft import PeftModel

    model = make_model(n_kv_head=2, qkv_bias=False, o_bias=False)
    export_hf(model, tmp_path / "hf")
    spec = SPECS["lora"] if method == "lora" else SPECS["adalora"]
    attach(model, spec)
    perturb(model)
    export_peft(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        theirs = peft_model(x).logits
    ours = model.eval()(x)
    assert (ours - theirs).abs().max() < 1e-4
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(x).logits
    assert (plain - ours).abs().max() > 1e-3          # the adapter really changed the function


def test_adapter_errors(tmp_path):
    model = make_model(n_kv_head=2)
    with pytest.raises(ConfigError, match="match no linear layer"):
        attach(model, AdapterSpec("lora", dict(target_modules=["qkv"])))
    with pytest.raises(ConfigError, match="not one of"):
        AdapterSpec("lokr")
    with pytest.raises(ConfigError, match="r=0"):
        AdapterSpec("lora", dict(r=0))
    with pytest.raises(ConfigError, match="unexpected keyword"):
        AdapterSpec("prefix", dict(r=4))
    attach(model, SPECS["lora"])
    with pytest.raises(ConfigError, match="already has a lora adapter"):
        attach(model, SPECS["prompt"])
    save_adapter(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match="n_kv_head: adapter 2 vs model 1"):
        load_adapter(make_model(n_kv_head=1), tmp_path / "a")
    with pytest.raises(CheckpointError, match="not a kvlab adapter"):
        load_adapter(make_model(), tmp_path)
    with pytest.raises(ConfigError, match="tied"):
        attach(make_model(tie_embeddings=True), AdapterSpec("lora", dict(target_modules=["lm_head"])))
    with pytest.raises(ConfigError, match="PEFT export covers"):
        m = make_model()
        attach(m, SPECS["prompt"])
        export_peft(m, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_lora_target_patterns_select_by_full_name():
    model = make_model(n_kv_head=2)
    attach(model, AdapterSpec("lora", dict(target_modules=[r"layers\.[01]\.self_attn\.v_proj", "down_proj"])))
    assert sorted(lora_layers(model)) == sorted(["layers.0.self_attn.v_proj", "layers.1.self_attn.v_proj"]
                                                + [f"layers.{i}.mlp.down_proj" for i in range(4)])
    cfg = LoraConfig(target_modules=[r"layers\.[01]\.self_attn\.v_proj", "down_proj"])
    assert parameter_count(model.cfg, AdapterSpec("lora", cfg.to_dict())) == \
        8 * (2 * (64 + 32) + 4 * (128 + 64))

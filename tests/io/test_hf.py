"""HF transformers interop: transformers itself is the independent reference."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from kvlab import CheckpointError, ConfigError, load
from kvlab.io.hf import export_hf

from conftest import make_model

TOKENS = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))


def _hf_model(cls_config, **kw):
    torch.manual_seed(0)
    cfg = cls_config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=128, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


HF_CASES = {
    "llama-mha": (LlamaConfig, dict(num_key_value_heads=4, rope_theta=10000.0)),
    "llama-gqa": (LlamaConfig, dict(num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5)),
    "llama-mqa-bias-tied": (LlamaConfig, dict(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True)),
    "llama-head-dim": (LlamaConfig, dict(num_key_value_heads=2, head_dim=32)),
    "qwen2": (Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral-window": (MistralConfig, dict(num_key_value_heads=2, sliding_window=6)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_import_matches_transformers(tmp_path, case):
    cls, kw = HF_CASES[case]
    hf = _hf_model(cls, **kw)
    hf.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf")
    assert model.cfg.n_kv_head == kw["num_key_value_heads"]
    with torch.no_grad():
        expected = hf(TOKENS).logits
    torch.testing.assert_close(model(TOKENS), expected, rtol=1e-4, atol=1e-4)
    # Padded batch: HF with an attention mask vs kvlab with the same mask, on real positions.
    mask = torch.ones_like(TOKENS)
    mask[1, :5] = 0
    with torch.no_grad():
        hf_padded = hf(TOKENS, attention_mask=mask).logits
    torch.testing.assert_close(model(TOKENS, attention_mask=mask)[mask.bool()], hf_padded[mask.bool()],
                               rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint(tmp_path):
    hf = _hf_model(LlamaConfig, num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "hf")(TOKENS), hf(TOKENS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", [dict(n_kv_head=2), dict(n_kv_head=1), dict(n_kv_head=4, qkv_bias=True),
                                     dict(n_kv_head=1, qkv_bias=True, o_bias=True, tie_embeddings=True),
                                     dict(n_kv_head=2, sliding_window=5)])
def test_export_loads_in_transformers_with_same_logits(tmp_path, variant):
    model = make_model(**variant)
    export_hf(model, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == model.cfg.n_kv_head
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, model(TOKENS), rtol=1e-4, atol=1e-4)


def test_import_export_import_is_bit_exact(tmp_path):
    hf = _hf_model(LlamaConfig, num_key_value_heads=2, attention_bias=True)
    hf.save_pretrained(tmp_path / "a")
    first = load(tmp_path / "a")
    export_hf(first, tmp_path / "b")
    second = load(tmp_path / "b")
    assert first.cfg.replace(name=None) == second.cfg.replace(name=None)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # And the exported tensors equal HF's own, name for name.
    ours, theirs = (load_file(str(tmp_path / "b" / "model.safetensors")),
                    load_file(str(tmp_path / "a" / "model.safetensors")))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_export_bf16(tmp_path):
    model = make_model(n_kv_head=2)
    export_hf(model, tmp_path / "out", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "out" / "model.safetensors")).values())


def test_cla_export_explains_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError,
                       match="HF transformers has no architecture that shares KV across layers.*kvlab format"):
        export_hf(make_model(n_kv_head=1, cla=2), tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="learned positions"):
        export_hf(make_model(pos="learned"), tmp_path / "out")


def _write_config(path, **changes):
    hf = _hf_model(LlamaConfig, num_key_value_heads=2)
    hf.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported; kvlab imports llama, mistral, qwen2"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "RoPE scaling type 'llama3'"),
    (dict(num_key_value_heads=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(num_hidden_layers=4), r"missing \['layers.3"),
])
def test_import_errors_name_what_and_where(tmp_path, changes, match):
    _write_config(tmp_path / "m", **changes)
    with pytest.raises(CheckpointError, match=match):
        load(tmp_path / "m")


def test_import_truncated_weights(tmp_path):
    _write_config(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(tmp_path / "m")
    w.unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load(tmp_path / "m")


def test_unknown_source():
    with pytest.raises(CheckpointError, match="model 'no/such/model' not found.*built-in name"):
        load("no/such/model")


def test_converted_smollm2_exports_to_transformers(smollm2, tmp_path):
    from kvlab.convert.heads import convert

    mqa = convert(smollm2, n_kv_head=1, method="mean")
    export_hf(mqa, tmp_path / "mqa")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "mqa", dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == 1 and hf.config.tie_word_embeddings
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "mqa")
    msgs = [{"role": "user", "content": "Hi!"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert list(ids) == mqa.tokenizer.apply_chat_template(msgs)
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf(x).logits
    assert ((mqa(x) - theirs).abs().max() / theirs.abs().max()) < 1e-4
    back = load(tmp_path / "mqa")                      # and kvlab reads its own export
    assert torch.equal(back(x), mqa(x))


MLA = dict(attn_kind="mla", attn_options=dict(kv_lora_rank=12, qk_rope_head_dim=6, qk_nope_head_dim=10,
                                             v_head_dim=14))
ALIBI = dict(vocab_size=320, d_model=64, n_layer=2, n_head=4, n_kv_head=4, mlp="gelu", norm="layernorm",
             pos="alibi", tie_embeddings=True, d_ff=256)


@pytest.mark.parametrize("variant", [
    dict(n_kv_head=2), dict(n_kv_head=1, tie_embeddings=True, pad_token_id=257),     # pad = EOS, as in SmolLM2
    dict(n_kv_head=4, qkv_bias=True), dict(n_kv_head=2, sliding_window=5), dict(**MLA, tie_embeddings=True),
    ALIBI], ids=["llama", "llama-pad-is-eos", "qwen2", "mistral", "deepseek_v3", "mpt"])
def test_a_reward_model_exports_as_a_sequence_classifier_that_scores_alike(tmp_path, variant):
    """A model with a score head is *ForSequenceClassification in transformers, scores every row as
    kvlab does under right and left padding — a row that ends in EOS too, where EOS is the pad token
    and both read the token before it — and imports back with its head."""
    from transformers import AutoModelForSequenceClassification

    from kvlab.models.heads import add_score_head

    model = add_score_head(make_model(**variant), n_outputs=2, seed=0)
    if model.cfg.pos == "alibi":                 # MPT's LayerNorms have no bias
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.bias") or name == "norm.bias":
                    p.zero_()
    export_hf(model, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and len(config["id2label"]) == 2
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    pad, eos = model.cfg.pad_token_id, model.cfg.eos_token_id
    right = torch.tensor([[5, 6, 7, 8, eos], [9, 10, 11, pad, pad], [12, 13, eos, pad, pad]])
    left = torch.tensor([[5, 6, 7, 8, eos], [pad, pad, 9, 10, 11], [pad, pad, 12, 13, eos]])
    back = load(tmp_path / "rm")
    assert back.cfg.score_outputs == 2
    right_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    for tokens, mask in ((right, right_mask), (left, right_mask.flip(1))):
        with torch.no_grad():
            ours = model.sequence_scores(tokens, attention_mask=mask)
            torch.testing.assert_close(hf(input_ids=tokens, attention_mask=mask).logits, ours, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(back.sequence_scores(tokens, attention_mask=mask), ours)
    if pad == eos:               # the row "12 13 EOS" is read at 13, the same as "12 13" alone
        with torch.no_grad():
            torch.testing.assert_close(model.sequence_scores(right[2:, :3]), model.sequence_scores(right[2:, :2]))
    if not model.cfg.tie_embeddings:            # a sequence classifier has no LM head
        assert "lm_head.weight" not in load_file(str(tmp_path / "rm" / "model.safetensors"))
        assert not back.lm_head.weight.any() and back.provenance["source"]["lm_head"].startswith("absent")

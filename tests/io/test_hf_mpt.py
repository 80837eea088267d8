"""ALiBi parity with transformers: MPT checkpoints (random weights built by transformers) imported
into kvlab and kvlab ALiBi models exported as MPT give the same logits in both libraries."""

from __future__ import annotations

import json

import pytest
import torch

from kvlab import ModelConfig, Transformer
from kvlab.errors import CheckpointError, ConfigError
from kvlab.io.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")


def _mpt(tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = transformers.MptConfig(d_model=64, n_heads=8, n_layers=3, vocab_size=97, max_seq_len=64, **overrides)
    model = transformers.MptForCausalLM(cfg).eval()
    with torch.no_grad():                   # LayerNorm weights away from 1, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "mpt")
    return model


def test_imported_mpt_gives_transformers_logits(tmp_path):
    theirs = _mpt(tmp_path)
    ours = import_hf(tmp_path / "mpt").eval()
    assert ours.cfg.pos == "alibi" and ours.cfg.mlp == "gelu" and ours.cfg.norm == "layernorm"
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-4, atol=1e-4)
        # Decoding through kvlab's cache against transformers' full forward.
        cache = ours.new_cache(2, 40)
        steps = [ours(tokens[:, :17], cache=cache)] + [ours(tokens[:, t:t + 1], cache=cache) for t in range(17, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), theirs(tokens).logits, rtol=1e-4, atol=1e-4)


def test_kvlab_alibi_model_exports_as_mpt(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=90, d_model=64, n_layer=2, n_head=4, mlp="gelu", norm="layernorm", pos="alibi",
                      tie_embeddings=True, max_seq_len=48)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    export_hf(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mpt"
    theirs = transformers.MptForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 90, (3, 33))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    back = import_hf(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), ours(tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("changes, match", [
    (dict(n_head=6, d_model=48), "n_head=6, not a power of two"),
    (dict(n_kv_head=1), "1 KV heads for 4 query heads"),
    (dict(cla=2), "Cross-Layer Attention"),
    (dict(tie_embeddings=False), "an untied LM head"),
    (dict(norm="rmsnorm"), "RMSNorm"),
])
def test_alibi_models_mpt_cannot_hold_are_refused(tmp_path, changes, match):
    base = dict(vocab_size=90, d_model=64, n_layer=2, n_head=4, mlp="gelu", norm="layernorm", pos="alibi",
                tie_embeddings=True)
    model = Transformer(ModelConfig(**{**base, **changes, **({"d_ff": 4 * changes["d_model"]}
                                                          if "d_model" in changes else {})}))
    with pytest.raises(ConfigError, match=match):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nonzero_layernorm_biases_are_refused(tmp_path):
    model = Transformer(ModelConfig(vocab_size=90, d_model=64, n_layer=2, n_head=4, mlp="gelu", norm="layernorm",
                                    pos="alibi", tie_embeddings=True))
    with torch.no_grad():
        model.layers[1].input_layernorm.bias.fill_(0.1)
    with pytest.raises(ConfigError, match="nonzero LayerNorm biases"):
        export_hf(model, tmp_path / "out")


def test_mpt_features_kvlab_lacks_are_named(tmp_path):
    _mpt(tmp_path, attn_config={"clip_qkv": 6.0})
    with pytest.raises(CheckpointError, match="clip_qkv=6.0"):
        import_hf(tmp_path / "mpt")

"""T5 parity with transformers: T5ForConditionalGeneration checkpoints (random weights built by
transformers; T5 v1.1 and the original T5) imported into kvlab, and kvlab encoder–decoders exported
as T5 (GQA/MQA and cross-layer sharing written out as copies), give the same logits in both."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from kvlab import EncoderDecoder, ModelConfig
from kvlab.convert.heads import convert
from kvlab.errors import CheckpointError, ConfigError
from kvlab.io.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")

FLAVOURS = {"v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
            "original": dict(feed_forward_proj="relu", tie_word_embeddings=True)}


def _t5(tmp_path, flavour: str):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                dropout_rate=0.0, decoder_start_token_id=0, **FLAVOURS[flavour])
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():            # norms away from 1 and (v1.1) an untied head, so a mix-up would show
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
        if flavour == "v1.1":
            model.lm_head.weight = torch.nn.Parameter(0.05 * torch.randn_like(model.lm_head.weight))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "t5")
    return model


def _batch():
    src = torch.randint(2, 64, (3, 11))
    mask = torch.ones_like(src)
    mask[1, 7:] = 0                    # right padding, as T5's tokenizers pad
    mask[2, 3:] = 0
    return src, mask, torch.randint(2, 64, (3, 6))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_imported_t5_gives_transformers_logits(tmp_path, flavour):
    theirs = _t5(tmp_path, flavour)
    ours = import_hf(tmp_path / "t5").eval()
    cfg = ours.cfg
    assert isinstance(ours, EncoderDecoder) and cfg.n_encoder_layer == 2 and cfg.n_layer == 3
    assert cfg.mlp == ("geglu" if flavour == "v1.1" else "relu")
    assert cfg.tie_embeddings == (flavour == "original")
    assert cfg.output_scale == (32 ** -0.5 if flavour == "original" else 1.0)
    src, mask, tgt = _batch()
    with torch.no_grad():
        want = theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(ours(src, tgt, src_mask=mask), want, rtol=1e-4, atol=1e-4)
        # decoding through kvlab's caches against transformers' full forward
        cache = ours.new_cache(3, 6)
        steps = [ours(src, tgt[:, :2], src_mask=mask, cache=cache)]
        steps += [ours(None, tgt[:, t:t + 1], cache=cache) for t in range(2, 6)]
        torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_exported_t5_gives_kvlab_logits(tmp_path, flavour):
    _t5(tmp_path, flavour)
    ours = import_hf(tmp_path / "t5").eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_hf(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "t5" and config["architectures"] == ["T5ForConditionalGeneration"]
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    src, mask, tgt = _batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits,
                                   ours(src, tgt, src_mask=mask), rtol=1e-4, atol=1e-4)
    assert import_hf(tmp_path / "out").cfg == ours.cfg.replace(name=ours.cfg.name)


def test_converted_decoder_exports_as_copies(tmp_path):
    """GQA self-attention, MQA cross-attention shared by two layers: transformers' MHA T5 computes the
    same logits from the copies (and says why it keeps the larger cache)."""
    _t5(tmp_path, "v1.1")
    gqa = convert(import_hf(tmp_path / "t5"), n_kv_head=2, cross_n_kv_head=1, cross_cla=2).eval()
    with pytest.warns(UserWarning, match="MHA in every layer"):
        export_hf(gqa, tmp_path / "out")
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    src, mask, tgt = _batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits,
                                   gqa(src, tgt, src_mask=mask), rtol=1e-4, atol=1e-4)


def test_unexportable_and_bad_checkpoints(tmp_path):
    rope = EncoderDecoder(ModelConfig(vocab_size=40, d_model=32, n_head=4, n_encoder_layer=1, pos="rope"))
    with pytest.raises(ConfigError, match="cannot export to HF T5: rope positions"):
        export_hf(rope, tmp_path / "rope")
    assert not (tmp_path / "rope").exists()
    _t5(tmp_path, "v1.1")
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    (tmp_path / "t5" / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-relu"}))
    with pytest.raises(CheckpointError, match="feed_forward_proj 'gated-relu' is not supported"):
        import_hf(tmp_path / "t5")
    (tmp_path / "t5" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(CheckpointError, match="do not match a T5 of this config"):
        import_hf(tmp_path / "t5")

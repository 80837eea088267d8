import json

import pytest
import torch

from kvlab import CheckpointError, load
from kvlab.io import save_checkpoint
from kvlab.io.atomic import write_dir_atomically
from kvlab.io.kvlab_format import load_checkpoint
from kvlab.io.tokenizer import ByteTokenizer

from conftest import make_model


@pytest.mark.parametrize("variant", [dict(n_kv_head=1, cla=2), dict(tie_embeddings=True, qkv_bias=True),
                                     dict(pos="learned", block="parallel")])
def test_save_load_round_trip_is_exact(tmp_path, variant):
    model = make_model(**variant)
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    loaded = load(tmp_path / "ckpt")
    tokens = torch.randint(0, 256, (2, 9))
    assert torch.equal(model(tokens), loaded(tokens))
    assert loaded.cfg == model.cfg
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert loaded.provenance["source"]["kind"] == "init"
    if model.cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format"] == "kvlab" and config["schema_version"] == 1


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path):
    save_checkpoint(make_model(seed=1), tmp_path / "ckpt")

    def crash(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir_atomically(tmp_path / "ckpt", crash, kind="kvlab-checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]       # no temp dir left
    load(tmp_path / "ckpt")                                              # the old checkpoint is intact
    save_checkpoint(make_model(seed=2), tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="model '.*nope' not found: give a kvlab or HF checkpoint directory"):
        load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a kvlab nor a HF checkpoint directory"):
        load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(make_model(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(tmp_path / "ckpt")
    save_checkpoint(make_model(), tmp_path / "ckpt2")
    cfg_path = tmp_path / "ckpt2" / "config.json"
    data = json.loads(cfg_path.read_text())
    data["model"]["n_kv_head"] = 4
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \(32, 64\), the config implies \(64, 64\)"):
        load(tmp_path / "ckpt2")
    data["schema_version"] = 99
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="schema_version=99"):
        load(tmp_path / "ckpt2")

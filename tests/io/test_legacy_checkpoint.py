"""Checkpoints written by kvlab 0.1.0 (before attention kinds existed) still load, with identical logits.

The fixture holds the config.json that release wrote, how the weights were made (seeded), the
tokens and the logits that release computed from them.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import kvlab
from kvlab import ModelConfig, Transformer

FIXTURE = Path(__file__).parent.parent / "fixtures" / "legacy_checkpoint_v0_1.json"


def test_a_checkpoint_of_the_previous_release_loads_with_identical_logits(tmp_path):
    fx = json.loads(FIXTURE.read_text())
    config = fx["config_json"]
    assert "attn_kind" not in config["model"] and "attention_layers" not in config["model"]   # truly the old schema
    cfg = ModelConfig.from_dict(config["model"])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()
                  if not (cfg.tie_embeddings and k == "lm_head.weight")}
    g = torch.Generator().manual_seed(1234)
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in sorted(shapes.items())}
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    model = kvlab.load(tmp_path)
    assert [s.kind for s in model.cfg.layer_specs] == ["gqa"] * cfg.n_layer
    with torch.no_grad():
        logits = model(torch.tensor(fx["tokens"]))[0]
    assert torch.equal(logits, torch.tensor(fx["logits"]))

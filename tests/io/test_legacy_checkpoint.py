"""Checkpoints written by kvlab 0.1.0 (before attention kinds existed) still load, with the same logits.

The fixture holds the config.json that release wrote, how the weights were made (seeded), the
tokens and the logits that release computed from them.

"The same logits" means equal within float32 arithmetic on any CPU, not bit for bit: the fixture
was written on one machine, and MKL/oneDNN pick different matrix kernels (AVX2, AVX-512, AMX)
and summation orders on others. On a 2-core AVX2-only EPYC the logits differ from the fixture's
by at most 5.2e-8 — the last bits of numbers of order 0.1 after four layers. The bound below,
1e-6 absolute, leaves 20x room for that, while a wrong weight mapping (a transposed, swapped or
misnamed matrix) moves the logits by about 1e-2 to 1e-1: the test checks that margin too, so the
bound cannot be loose enough to let a schema regression through.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import kvlab
from kvlab import ModelConfig, Transformer

FIXTURE = Path(__file__).parent.parent / "fixtures" / "legacy_checkpoint_v0_1.json"
ATOL = 1e-6     # float32 on another CPU's kernels: observed 5.2e-8 (see the module docstring)


def _write_legacy_checkpoint(directory: Path, fx: dict, edit=None) -> ModelConfig:
    """Write the 0.1.0 checkpoint as that release did: its config.json and the seeded weights.
    ``edit(state)`` may corrupt the weights first (to show what a wrong mapping does)."""
    config = fx["config_json"]
    cfg = ModelConfig.from_dict(config["model"])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()
                  if not (cfg.tie_embeddings and k == "lm_head.weight")}
    g = torch.Generator().manual_seed(1234)
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in sorted(shapes.items())}
    if edit is not None:
        edit(state)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return cfg


def _logits(directory: Path, tokens) -> torch.Tensor:
    model = kvlab.load(directory)
    with torch.no_grad():
        return model(torch.tensor(tokens))[0]


def test_a_checkpoint_of_the_previous_release_loads_with_the_same_logits(tmp_path):
    fx = json.loads(FIXTURE.read_text())
    assert "attn_kind" not in fx["config_json"]["model"]                    # truly the old schema
    assert "attention_layers" not in fx["config_json"]["model"]
    cfg = _write_legacy_checkpoint(tmp_path, fx)
    assert [s.kind for s in kvlab.load(tmp_path).cfg.layer_specs] == ["gqa"] * cfg.n_layer

    want = torch.tensor(fx["logits"])
    got = _logits(tmp_path, fx["tokens"])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # The argmax at every position, too. The fixture's top-two gaps are far above 2 * ATOL, so a
    # result within ATOL cannot flip it: this is the release's behaviour, not a tie broken by luck.
    top2 = want.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 2 * ATOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_the_bound_catches_a_wrong_weight_mapping(tmp_path):
    """The tolerance is no blanket: a single transposed projection moves the logits far past it."""
    fx = json.loads(FIXTURE.read_text())

    def transpose_one_projection(state):
        name = "layers.1.self_attn.o_proj.weight"           # square (d_model x n_head * head_dim)
        state[name] = state[name].t().contiguous()

    _write_legacy_checkpoint(tmp_path, fx, edit=transpose_one_projection)
    moved = (_logits(tmp_path, fx["tokens"]) - torch.tensor(fx["logits"])).abs().max().item()
    assert moved > 1000 * ATOL, moved

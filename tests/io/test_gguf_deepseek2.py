"""MLA models exported as llama.cpp's ``deepseek2`` GGUF: the file's metadata and tensors against what
llama.cpp's loader requires, and its logits computed the way llama.cpp's deepseek2 graph computes them
(float64 NumPy from the file's own tensors: adjacent rotary pairs, the RMS-normalised latent, absorbed
attention) against kvlab's forward; with llama.cpp itself where ``llama-cpp-python`` is installed
(benchmarks/llama_cpp_check.py builds it; not a dependency)."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from deepseek2_reference import _fields, gguf_tensors
from deepseek2_reference import deepseek2_logits as _deepseek2_logits
from kvlab import ConfigError, ModelConfig, Transformer
from kvlab.io.gguf_export import export_gguf, gguf_architecture

TOKENS = [1, 9690, 28, 216, 4040, 3445, 30, 17, 2, 5, 900, 31000, 77, 123]


def _mla(smollm2, *, latent_norm: bool, tie: bool = False, q_lora_rank=None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    opts = dict(kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=16, latent_norm=latent_norm,
                q_lora_rank=q_lora_rank)
    cfg = ModelConfig.from_preset("tiny", vocab_size=smollm2.cfg.vocab_size, d_model=64, n_layer=2, n_head=4,
                                  d_ff=128, max_seq_len=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                  attn_kind="mla", attn_options=opts, tie_embeddings=tie, rope_theta=5000.0)
    model = Transformer(cfg).eval()
    with torch.no_grad():          # norms away from 1, so that a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.tokenizer = smollm2.tokenizer
    return model


@pytest.mark.parametrize("latent_norm,tie,q_lora_rank", [(True, False, None), (False, False, None),
                                                         (False, True, None), (True, False, 16)],
                         ids=["normalised-latent", "norm-free-latent", "norm-free-tied", "query-compression"])
def test_an_mla_model_is_a_deepseek2_gguf_that_computes_kvlabs_logits(smollm2, tmp_path, latent_norm, tie,
                                                                     q_lora_rank):
    model = _mla(smollm2, latent_norm=latent_norm, tie=tie, q_lora_rank=q_lora_rank)
    assert gguf_architecture(model.cfg) == "deepseek2"
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type="f32")
    reader = GGUFReader(str(path))
    f = _fields(reader)
    # what llama.cpp's deepseek2 loader needs for a dense model without query compression
    assert f["deepseek2.attention.head_count_kv"] == 1 and f["deepseek2.attention.q_lora_rank"] == (q_lora_rank or 0)
    assert f["deepseek2.leading_dense_block_count"] == f["deepseek2.block_count"] == 2
    assert (f["deepseek2.attention.key_length"], f["deepseek2.attention.value_length"]) == (24 + 8, 24)
    assert (f["deepseek2.attention.key_length_mla"], f["deepseek2.attention.value_length_mla"]) == (12 + 8, 16)
    assert "deepseek2.expert_feed_forward_length" in f and f["deepseek2.expert_shared_count"] == 0
    names = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert names["blk.0.attn_k_b.weight"] == [12, 24, 4] and names["blk.0.attn_v_b.weight"] == [24, 16, 4]
    assert not any("kv_b" in n or n.endswith(".bias") for n in names)
    assert ("output.weight" in names) != tie
    with torch.no_grad():
        want = model(torch.tensor([TOKENS])).double()[0].numpy()
    got = _deepseek2_logits(path, TOKENS)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_deepseek2_rotates_adjacent_pairs_so_kvlabs_halves_are_permuted(smollm2, tmp_path):
    """kvlab rotates the two halves of a RoPE block, llama.cpp adjacent pairs: the same file with its RoPE
    rows put back in kvlab's order (what an export without the permutation would hold) computes other
    logits, the file as written kvlab's."""
    model = _mla(smollm2, latent_norm=True)
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type="f32")
    with torch.no_grad():
        want = model(torch.tensor([TOKENS])).double()[0].numpy()
    unpermuted = gguf_tensors(path)
    for i in range(2):
        q = unpermuted[f"blk.{i}.attn_q.weight"].reshape(4, 20, -1)
        q[:, 12:] = q[:, 12:].reshape(4, 4, 2, -1).transpose(0, 2, 1, 3).reshape(4, 8, -1)   # pairs -> halves
        kv_a = unpermuted[f"blk.{i}.attn_kv_a_mqa.weight"]
        kv_a[24:] = kv_a[24:].reshape(4, 2, -1).transpose(1, 0, 2).reshape(8, -1)
    np.testing.assert_allclose(unpermuted["blk.0.attn_q.weight"],
                               model.layers[0].self_attn.q_proj.weight.detach().double().numpy(), rtol=1e-6)
    err = lambda got: np.abs(got - want).max() / np.abs(want).max()     # noqa: E731
    assert err(_deepseek2_logits(path, TOKENS)) < 1e-5
    assert err(_deepseek2_logits(path, TOKENS, unpermuted)) > 1e-3          # 100x the tolerance above


def test_what_deepseek2_cannot_hold_is_refused(smollm2, tmp_path):
    model = _mla(smollm2, latent_norm=True)
    for change, match in ((dict(qkv_bias=True), "biases"), (dict(cla=2), "Cross-Layer Attention")):
        bad = Transformer(model.cfg.replace(**change))
        bad.tokenizer = model.tokenizer
        with pytest.raises(ConfigError, match=f"deepseek2 architecture.*{match}"):
            export_gguf(bad, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("latent_norm", [True, False], ids=["normalised-latent", "norm-free-latent"])
def test_llama_cpp_runs_the_deepseek2_export_with_kvlabs_logits(smollm2, tmp_path, latent_norm):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                                        "(benchmarks/llama_cpp_check.py builds it)")
    model = _mla(smollm2, latent_norm=latent_norm)
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)                     # F32 cache: the comparison is exact
    llm.eval(TOKENS)
    got = np.array(llm.scores[:len(TOKENS)], dtype=np.float64)
    with torch.no_grad():
        want = model(torch.tensor([TOKENS])).double()[0].numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()

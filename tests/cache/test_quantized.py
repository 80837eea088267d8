"""int8 / int4 KV caches against independent references: codes and scales computed in float64 with
NumPy's bit operations, the accounting against the bytes allocated, logits close to the float
cache's for every attention variant, and the paged pool and generation agreeing on quantized caches."""

import numpy as np
import pytest
import torch

from kvlab.cache.paged import PagedKVPool
from kvlab.cache.quantized import QuantizedTokenLayer, dequantize, quantize
from kvlab.config.accounting import cache_bytes
from kvlab.dtypes import parse_kv_quant
from kvlab.errors import ConfigError
from kvlab.inference.engine import Engine, Request
from kvlab.inference.generation import generate

from conftest import VARIANTS, make_model


def _reference(x: np.ndarray, bits: int, group: int):
    """Codes (unpacked) and float16 parameters in float64 arithmetic, round half to even. int8
    (llama.cpp q8_0): scale = absmax / 127, codes in [-128, 127]. int4 (q4_1): scale = (max - min) / 15
    and the minimum, both float16, codes (x - min) / scale in [0, 15]; parameters interleaved."""
    g = x.astype(np.float64).reshape(*x.shape[:-1], x.shape[-1] // group, group)
    if bits == 8:
        scales = (np.abs(g).max(-1) / 127).astype(np.float16)
        s = scales.astype(np.float64)
        s[s == 0] = 1
        codes = np.clip(np.round(g / s[..., None]), -128, 127).astype(np.int8).reshape(x.shape)
        return codes, scales, scales.astype(np.float64), np.zeros_like(s)
    low = g.min(-1).astype(np.float16)
    scale = ((g.max(-1) - low.astype(np.float64)) / 15).astype(np.float16)
    s = scale.astype(np.float64)
    s[s == 0] = 1
    codes = np.clip(np.round((g - low.astype(np.float64)[..., None]) / s[..., None]), 0, 15).astype(np.int8)
    params = np.stack([scale, low], -1).reshape(*scale.shape[:-1], -1)
    return codes.reshape(x.shape), params, scale.astype(np.float64), low.astype(np.float64)


def _unpack_int4(packed: np.ndarray) -> np.ndarray:
    lo = (packed & 0x0F).astype(np.int8)
    hi = (packed >> 4).astype(np.int8)
    return np.stack([lo, hi], -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("width", [64, 18, 96])
def test_codes_and_scales_equal_a_float64_reference(bits, width):
    x = torch.randn(3, 2, 7, width) * torch.logspace(-2, 1, width) + 0.5    # uneven channels, a shift
    x[0, 0, 0] = 0                                                         # an all-zero vector: scale 0
    codes, params = quantize(x, bits)
    group = 32 if width % 32 == 0 else width
    want_codes, want_params, scale, low = _reference(x.numpy(), bits, group)
    got = codes.numpy() if bits == 8 else _unpack_int4(codes.numpy())
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape[-1] == width * bits // 8 and params.shape[-1] == width // group * (1 if bits == 8 else 2)
    np.testing.assert_array_equal(params.numpy(), want_params)
    # torch.round and np.round both round half to even; float32 vs float64 division may differ at an
    # exact .5 tie, which random data essentially never hits.
    assert (got != want_codes).mean() < 1e-3
    back = dequantize(codes, params, bits, torch.float64).numpy()
    x64 = x.double().numpy()
    step = scale.repeat(group, -1).reshape(x.shape)
    floor = np.abs(low).repeat(group, -1).reshape(x.shape)
    # half a step, plus what the float16 rounding of the parameters can add at the range's ends
    assert np.all(np.abs(back - x64) <= step / 2 + 2.0 ** -10 * (15 * step + floor) + 1e-6 * np.abs(x64))
    assert np.all(back[0, 0, 0] == 0)


def test_an_odd_width_cannot_be_int4():
    with pytest.raises(ConfigError, match="int4 packs two channels"):
        odd = make_model(attn_kind="mla", attn_options=dict(kv_lora_rank=11, qk_rope_head_dim=6)).cfg
        cache_bytes(odd, "fp32", "int4")


def _e4m3_reference(x: np.ndarray) -> np.ndarray:
    """float8 e4m3 (fn: no infinities) by its definition, in float64: 3 mantissa bits, exponents
    -6..8, subnormals in steps of 2^-9 below 2^-6, round half to even, saturated at ±448."""
    a = np.minimum(np.abs(x.astype(np.float64)), 448.0)
    exponent = np.clip(np.floor(np.log2(np.maximum(a, 2.0 ** -9))), -6, 8)
    step = 2.0 ** (exponent - 3)
    return np.sign(x) * np.minimum(np.round(a / step) * step, 448.0)


def test_fp8_values_equal_the_e4m3_definition():
    from kvlab.cache.quantized import decode, encode
    from kvlab.dtypes import parse_kv_quant

    fp8 = parse_kv_quant("fp8")
    x = torch.randn(2, 3, 5, 64, dtype=torch.float64) * torch.logspace(-4, 3, 64, dtype=torch.float64)
    x[0, 0, 0, :3] = torch.tensor([1e4, -1e4, 0.0], dtype=torch.float64)        # saturated, zero
    codes, params = encode(x, fp8)
    assert codes.dtype == torch.float8_e4m3fn and params is None and codes.shape == x.shape
    np.testing.assert_array_equal(decode(codes, None, fp8, torch.float64).numpy(), _e4m3_reference(x.numpy()))
    assert cache_bytes(make_model(n_kv_head=2).cfg, torch.float32, "fp8").per_token == 4 * 2 * 2 * 16   # 1 byte each


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("kv_quant", ["fp8", "int8", "int4"])
@torch.inference_mode()
def test_every_variant_runs_on_a_quantized_cache(name, kv_quant):
    model = make_model(**VARIANTS[name])
    try:
        want_bytes = cache_bytes(model.cfg, torch.float32, kv_quant).for_sequence(40) * 2
    except ConfigError as e:                  # int4 of an odd-width latent: refused, not mis-packed
        assert "int4 packs" in str(e)
        return
    x = torch.randint(0, model.cfg.vocab_size, (2, 24))
    plain = model(x)
    cache = model.new_cache(2, 40, kv_quant=kv_quant)
    assert cache.nbytes == want_bytes
    logits = model(x[:, :20], cache=cache)
    for t in range(20, 24):
        logits = torch.cat([logits, model(x[:, t:t + 1], cache=cache)], 1)
    err = (logits - plain).abs().max() / plain.abs().max()
    quantized = any(isinstance(layer, QuantizedTokenLayer) for layer in cache.layers.values())
    assert err < (0.02 if kv_quant == "int8" else 0.2)
    if quantized:
        assert err > 0                             # the cache really was quantized


@torch.inference_mode()
def test_the_stored_codes_are_the_quantized_keys_and_values():
    model = make_model(n_kv_head=2)
    x = torch.randint(0, 256, (2, 12))
    plain = model.new_cache(2, 12)
    quant = model.new_cache(2, 12, kv_quant="int4")
    model(x, cache=plain)
    model(x, cache=quant)
    layer = quant.layers[0]
    for field, stored in (("keys", plain.keys[0]), ("values", plain.values[0])):
        want_codes, want_params, _, _ = _reference(stored.numpy(), 4, 16)
        got = _unpack_int4(getattr(layer, field + "_codes").numpy())
        np.testing.assert_array_equal(getattr(layer, field + "_scales").numpy(), want_params)
        assert (got != want_codes).mean() < 1e-3


def test_accounting_counts_the_scales_and_the_pool_follows_it():
    cfg = make_model(n_kv_head=2, d_model=128, n_head=2).cfg         # head_dim 64: two groups of 32
    n = cache_bytes(cfg, torch.float16).per_token // 2                 # cached channels per token
    assert cache_bytes(cfg, torch.float16, "int8").per_token == n + n // 32 * 2         # 1 byte each + 2 per 32
    assert cache_bytes(cfg, torch.float16, "int4").per_token == n // 2 + n // 32 * 4    # + scale and min
    assert cache_bytes(cfg, torch.float16, "fp8").per_token == n                         # no scales
    for q in ("fp8", "int8", "int4"):
        pool = PagedKVPool(cfg, budget_bytes=2**20, max_len=64, block_size=16, kv_quant=parse_kv_quant(q))
        assert pool.block_bytes == cache_bytes(cfg, torch.float32, q).per_token * 16
        assert pool.nbytes <= 2**20


@torch.inference_mode()
def test_keys_and_values_in_two_formats():
    """An int8/int4 cache stores its keys exactly as an int8 cache does and its values as an int4 one,
    and counts its bytes so (llama.cpp's -ctk q8_0 -ctv q4_1)."""
    model = make_model(n_kv_head=2, d_model=128, n_head=2)           # head_dim 64: two groups of 32
    x = torch.randint(0, 256, (2, 12))
    caches = {q: model.new_cache(2, 12, kv_quant=q) for q in ("int8", "int4", "int8/int4")}
    for c in caches.values():
        model(x, cache=c)
    mixed, keys_like, values_like = caches["int8/int4"].layers[0], caches["int8"].layers[0], caches["int4"].layers[0]
    for name in ("keys_codes", "keys_scales"):
        assert torch.equal(getattr(mixed, name), getattr(keys_like, name))
    for name in ("values_codes", "values_scales"):
        assert torch.equal(getattr(mixed, name), getattr(values_like, name))
    cfg = model.cfg
    n = cache_bytes(cfg, torch.float16).per_token // 4                # channels of the keys (= of the values)
    assert cache_bytes(cfg, torch.float16, "int8/int4").per_token == (n + n // 32 * 2) + (n // 2 + n // 32 * 4)
    assert caches["int8/int4"].nbytes == cache_bytes(cfg, torch.float32, "int8/int4").for_sequence(12) * 2
    pool = PagedKVPool(cfg, budget_bytes=2**20, max_len=64, block_size=16, kv_quant=parse_kv_quant("int8/int4"))
    assert pool.block_bytes == cache_bytes(cfg, torch.float32, "int8/int4").per_token * 16


def test_keys_and_values_in_two_formats_need_separate_keys_and_values():
    assert parse_kv_quant("INT8/int4").name == "int8/int4"
    assert parse_kv_quant("int8/int8") == parse_kv_quant("int8")           # one format, said twice
    for bad in ("int8/int5", "int8/int4/fp8", "/int4"):
        with pytest.raises(ConfigError, match="unknown KV quantization"):
            parse_kv_quant(bad)
    for name in ("mla", "lowrank"):
        with pytest.raises(ConfigError, match="keys and values at once.*use one format"):
            make_model(**VARIANTS[name]).new_cache(1, 8, kv_quant="int8/int4")


@pytest.mark.parametrize("name, kv_quant", [("gqa", "int8"), ("mla", "int8"), ("rolling-hybrid", "int8"),
                                            ("gqa", "fp8"), ("gqa", "int8/int4")])
def test_the_engine_serves_quantized_caches_as_generate_runs_them(name, kv_quant):
    model = make_model(**VARIANTS[name])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 15, 3)]
    engine = Engine(model, kv_budget_bytes=2**20, max_len=48, block_size=4, prefill_chunk=5, kv_quant=kv_quant)
    reqs = [engine.submit(Request(p, 10, stop_tokens=frozenset())) for p in prompts]
    engine.run_until_done()
    for r, p in zip(reqs, prompts):
        assert r.output == generate(model, [p], 10, stop_tokens=[], kv_quant=kv_quant)[0]


@pytest.mark.parametrize("kv_quant", ["fp8", "int8", "int4"])
def test_decoding_into_a_buffer_equals_decoding_afresh(kv_quant):
    from kvlab.cache.quantized import decode, encode

    fmt = parse_kv_quant(kv_quant)
    x = torch.randn(2, 3, 9, 64) * torch.logspace(-2, 1, 64)
    codes, params = encode(x, fmt)
    out = torch.full((2, 3, 9, 64), float("nan"))
    assert decode(codes, params, fmt, torch.float32, out=out) is out
    torch.testing.assert_close(out, decode(codes, params, fmt, torch.float32), rtol=0, atol=0)


def test_producers_whose_readers_overlap_decode_into_different_slots():
    """kv_source [0, 0, 2, 0, 4]: layer 3 reads layer 0's entries after layer 2 has written its own, so
    0 and 2 need two slots; 4 comes after 0's last reader and takes its slot again."""
    model = make_model(n_kv_head=2, n_layer=5, kv_source=[0, 0, 2, 0, 4])
    cache = model.new_cache(2, 16, kv_quant="int8")
    assert {i: layer.slot for i, layer in cache.layers.items()} == {0: 0, 2: 1, 4: 0}
    assert len({id(layer.workspace) for layer in cache.layers.values()}) == 1


@pytest.mark.parametrize("name", ["kv-source", "mqa-cla2", "mla-cla2"])
@torch.inference_mode()
def test_the_shared_workspace_changes_no_result(name):
    """Decoding with the shared buffers gives exactly what fresh tensors per read give."""
    model = make_model(**VARIANTS[name])
    x = torch.randint(0, model.cfg.vocab_size, (2, 14))
    outs = []
    for shared in (True, False):
        cache = model.new_cache(2, 16, kv_quant="int8")
        if not shared:
            for layer in cache.layers.values():
                layer.workspace = None
        steps = [model(x[:, :10], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(10, 14)]
        outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@torch.inference_mode()
def test_a_format_per_layer_stores_each_layer_in_its_own():
    """``int8/int4+int4@1``: layer 0 keeps int8 keys and int4 values, layer 1 int4 for both; each
    layer's value codes equal the float64 reference of that layer's values in its own format, and the
    bytes are each layer's own, as the accounting and the paged pool count them."""
    model = make_model(n_kv_head=2, d_model=128, n_head=2, n_layer=3)         # head_dim 64: two groups
    spec = parse_kv_quant("int8/int4+int4@1+int8@2")
    values = {}
    hooks = [model.layers[i].self_attn.v_proj.register_forward_hook(
        lambda m, a, out, i=i: values.__setitem__(i, out)) for i in range(3)]
    cache = model.new_cache(2, 12, kv_quant=spec)
    model(torch.randint(0, 256, (2, 12)), cache=cache)
    for h in hooks:
        h.remove()
    want_bits = {0: (8, 4), 1: (4, 4), 2: (8, 8)}
    for i, (kbits, vbits) in want_bits.items():
        layer = cache.layers[i]
        assert (layer.formats["keys"].bits, layer.formats["values"].bits) == (kbits, vbits)
        v = values[i].view(2, 12, 2, 64).transpose(1, 2).numpy()            # (B, H, T, D) as the cache keeps it
        want, *_ = _reference(v, vbits, 32)
        got = layer.values_codes.numpy()
        got = got if vbits == 8 else _unpack_int4(got)
        assert (got != want).mean() < 1e-3
    n = 2 * 64                                                            # channels of keys (= of values) a layer
    int8, int4 = n + n // 32 * 2, n // 2 + n // 32 * 4
    assert cache_bytes(model.cfg, torch.float16, spec).per_token == (int8 + int4) + 2 * int4 + 2 * int8
    assert cache.nbytes == cache_bytes(model.cfg, torch.float32, spec).for_sequence(12) * 2
    pool = PagedKVPool(model.cfg, budget_bytes=2**20, max_len=64, block_size=16, kv_quant=spec)
    assert pool.block_bytes == cache_bytes(model.cfg, torch.float32, spec).per_token * 16


def test_a_format_per_layer_is_spelt_and_checked():
    spec = parse_kv_quant("INT8/int4 + int8@0-1,3 + fp8@4")
    assert [spec.for_layer(i).name for i in range(6)] == ["int8", "int8", "int8/int4", "int8", "fp8", "int8/int4"]
    assert spec.name == "int8/int4+fp8@4+int8@0-1,3" and parse_kv_quant(spec.name) == spec
    assert parse_kv_quant("int8+int8@2") == parse_kv_quant("int8")        # an override equal to the base
    for bad, match in [("int8+int4", "names no layers"), ("int8+int4@x", "not a list of layers"),
                       ("int8+int4@3-1", "not a list of layers"), ("int8+int4@1+fp8@1", "two formats"),
                       ("int8+int5@1", "unknown KV quantization")]:
        with pytest.raises(ConfigError, match=match):
            parse_kv_quant(bad)
    with pytest.raises(ConfigError, match="names layer 7, but the model has 4 layers"):
        make_model().new_cache(1, 8, kv_quant="int8+int4@7")
    with pytest.raises(ConfigError, match="keys and values at once"):
        make_model(**VARIANTS["mla"]).new_cache(1, 8, kv_quant="int8+int8/int4@1")
    mla = make_model(**VARIANTS["mla"])                                   # one format per layer suits a latent
    formats = mla.new_cache(1, 8, kv_quant="int8+int4@1").layers
    assert {f.bits for f in formats[0].formats.values()} == {8} and {f.bits for f in formats[1].formats.values()} == {4}

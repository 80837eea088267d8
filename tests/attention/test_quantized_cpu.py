"""The CPU kernel that attends straight from a quantized cache's codes, against float64 attention over
the same entries decoded by NumPy from the stored bytes (fp8 through its bit fields, int8/int4 codes
times their float16 scales), and in a model against the path that decodes the cache first."""

import numpy as np
import pytest
import torch

from kvlab.attention.kernels import quantized_cpu
from kvlab.attention.masks import AttentionMask
from kvlab.cache.quantized import QuantizedEntries, encode
from kvlab.dtypes import field_formats, parse_kv_quant

from conftest import make_model

pytestmark = pytest.mark.skipif(quantized_cpu.extension() is None, reason="no C++ compiler to build the kernel")


def _serves(q, k, v, mask=None, bias=None) -> bool:
    return quantized_cpu.decode_lengths(q, k, v, mask, bias) is not None


def _fp8_values(codes: torch.Tensor) -> np.ndarray:
    """e4m3 bytes -> float64 from the bit fields: (-1)^s 2^(e-7) (1 + m/8), subnormals 2^-6 m/8."""
    b = codes.view(torch.uint8).numpy().astype(np.int64)
    s, e, m = b >> 7, (b >> 3) & 15, b & 7
    mag = np.where(e == 0, 2.0 ** -6 * m / 8, 2.0 ** (e - 7) * (1 + m / 8))
    return np.where(s == 1, -mag, mag)


def _hadamard64(n: int) -> np.ndarray:
    """The normalised Sylvester Hadamard matrix of order n (a power of two), float64."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def _unrotated(values: np.ndarray) -> np.ndarray:
    """Stored entries of a rotated format, taken back by the block-diagonal Hadamard matrix (blocks of
    64 channels where the width allows, else 32)."""
    W = values.shape[-1]
    n = 64 if W % 64 == 0 else 32
    return (values.reshape(*values.shape[:-1], W // n, n) @ _hadamard64(n)).reshape(values.shape)


def _values(entries: QuantizedEntries) -> np.ndarray:
    """The stored entries as float64, from the bytes (not through kvlab's decoder): groups of 32
    channels, or one group where the width is not a multiple of 32; a rotated format's entries taken
    back by the Hadamard matrix (:func:`_unrotated`)."""
    stored = _stored_values(entries)
    return _unrotated(stored) if entries.kv_quant.rotated else stored


def _stored_values(entries: QuantizedEntries) -> np.ndarray:
    if entries.kv_quant.is_float:
        return _fp8_values(entries.codes)
    codes = entries.codes.numpy().astype(np.int64)
    p = entries.params.numpy().astype(np.float64)
    group = 32 if entries.width % 32 == 0 else entries.width
    if entries.kv_quant.bits == 8:
        g = codes.reshape(*codes.shape[:-1], -1, group) * p[..., None]
        return g.reshape(*codes.shape)
    unpacked = np.stack([codes & 15, codes >> 4], -1).reshape(*codes.shape[:-1], -1, group)
    p = p.reshape(*p.shape[:-1], -1, 2)
    return (unpacked * p[..., :1] + p[..., 1:]).reshape(*codes.shape[:-1], -1)


def _entries(x: torch.Tensor, fmt) -> QuantizedEntries:
    codes, params = encode(x, fmt)
    return QuantizedEntries(codes, params, fmt, torch.float32, layer=None, index=0)


def _formats(fmt: str):
    """(keys' format, values' format) of ``fmt`` ("int8", or keys/values in two: "int8/int4")."""
    return field_formats(parse_kv_quant(fmt), 2)


FORMATS = ["fp8", "int8", "int4", "int8/int4", "fp8/int4", "int4/fp8"]


def _attention64(q, k, v, scale, lengths=None):
    """Grouped-query softmax attention in float64: query head h reads KV head h // G; row b reads its
    first lengths[b] keys (none: zeros)."""
    q = q.double().numpy()
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    out = np.zeros((*q.shape[:3], v.shape[-1]))
    for b in range(q.shape[0]):
        n = k.shape[2] if lengths is None else lengths[b]
        if n == 0:
            continue
        s = np.einsum("hqd,hkd->hqk", q[b], k[b, :, :n]) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[b] = np.einsum("hqk,hkd->hqd", p, v[b, :, :n])
    return out


SHAPES = [(6, 2, 1, 64, 64, 37), (4, 4, 3, 32, 96, 5), (8, 1, 2, 128, 32, 300), (9, 1, 1, 176, 48, 20)]
# Rotated formats turn blocks of 64 channels (32 where 64 does not divide the width): whole blocks only.
ROTATED_SHAPES = [(6, 2, 1, 64, 64, 37), (8, 1, 2, 128, 32, 300), (4, 2, 1, 96, 96, 9)]


@pytest.mark.parametrize("fmt,heads,kv_heads,tq,dk,dv,tk",
                         [(f, *shape) for f in FORMATS for shape in SHAPES]
                         + [(f, *shape) for f in ("int4-h", "int8-h", "int8/int4-h", "int4-h/int8")
                            for shape in ROTATED_SHAPES])
def test_equals_float64_attention_over_the_stored_entries(fmt, heads, kv_heads, tq, dk, dv, tk):
    """Rotated keys and values are stored as codes of the rotated vectors; the kernel rotates the query
    and the output, which is attention over the stored entries rotated back."""
    torch.manual_seed(0)
    kf, vf = _formats(fmt)
    q = torch.randn(2, heads, tq, dk)
    # channels of very different sizes and a shift, as real keys have
    k = _entries(torch.randn(2, kv_heads, tk, dk) * torch.logspace(-1, 0.7, dk) + 0.3, kf)
    v = _entries(torch.randn(2, kv_heads, tk, dv), vf)
    assert _serves(q, k, v)
    got = quantized_cpu.quantized_decode(q, k, v, scale=dk ** -0.5)
    want = _attention64(q, _values(k), _values(v), dk ** -0.5)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_row_reads_its_own_number_of_keys(fmt):
    """A ragged batch (continuous batching): row b attends to its first lengths[b] slots; a row with
    none gets zeros."""
    torch.manual_seed(1)
    kf, vf = _formats(fmt)
    q = torch.randn(4, 6, 1, 64)
    k, v = _entries(torch.randn(4, 2, 50, 64), kf), _entries(torch.randn(4, 2, 50, 64), vf)
    lengths = torch.tensor([50, 7, 0, 33])
    got = quantized_cpu.quantized_decode(q, k, v, scale=0.125, lengths=lengths)
    want = _attention64(q, _values(k), _values(v), 0.125, lengths.tolist())
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_every_fp8_value_is_read_exactly():
    """One cached token: the output is its value vector itself, so every e4m3 byte (NaN's two left
    out), subnormals and -0 included, must come back exactly as its bit fields say."""
    byte_values = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    v_codes = byte_values.view(torch.float8_e4m3fn).reshape(1, 1, 1, -1)          # 254 channels... pad to 256
    v_codes = torch.cat([v_codes, torch.zeros(1, 1, 1, 2, dtype=torch.float8_e4m3fn)], -1)
    kvq = parse_kv_quant("fp8")
    v = QuantizedEntries(v_codes, None, kvq, torch.float32, layer=None, index=0)
    k = _entries(torch.randn(1, 1, 1, 64), kvq)
    out = quantized_cpu.quantized_decode(torch.randn(1, 1, 1, 64), k, v, scale=0.125)
    np.testing.assert_array_equal(out.reshape(-1).double().numpy(), _fp8_values(v_codes).reshape(-1))


def test_a_changed_code_changes_the_output():
    kvq = parse_kv_quant("int8")
    q = torch.randn(1, 2, 1, 64)
    k, v = _entries(torch.randn(1, 2, 9, 64), kvq), _entries(torch.randn(1, 2, 9, 64), kvq)
    before = quantized_cpu.quantized_decode(q, k, v, scale=0.125)
    v.codes[0, 1, 4, 40] += 50
    after = quantized_cpu.quantized_decode(q, k, v, scale=0.125)
    assert torch.equal(before[0, 0], after[0, 0])          # the other KV head's queries
    assert (after[0, 1] - before[0, 1]).abs().max() > 1e-3


def test_calls_it_does_not_serve():
    kvq = parse_kv_quant("int8")
    q = torch.randn(1, 2, 1, 64)
    k, v = _entries(torch.randn(1, 2, 9, 64), kvq), _entries(torch.randn(1, 2, 9, 64), kvq)
    assert quantized_cpu.decode_lengths(q, k, v, None, None).tolist() == [9]
    assert not _serves(q, k, v, bias=object())
    assert not _serves(q.double(), k, v)
    with torch.enable_grad():
        assert not _serves(q.clone().requires_grad_(), k, v)
    odd = _entries(torch.randn(1, 2, 9, 36), kvq)            # one group of 36: not 8 channels at a time
    assert not _serves(torch.randn(1, 2, 1, 36), odd, odd)
    # masks: a causal prefill block is not a decode step; a window that hides keys is not a prefix
    pos = torch.arange(9).unsqueeze(0)
    assert not _serves(torch.randn(1, 2, 9, 64), k, v, mask=AttentionMask(pos, pos))
    last = pos[:, -1:]
    assert quantized_cpu.decode_lengths(q, k, v, AttentionMask(last, pos), None).tolist() == [9]
    assert not _serves(q, k, v, mask=AttentionMask(last, pos, window=4))


# MLA reads its latents + RoPE keys (one 48-wide entry, a single int group) as keys and values.
MLA = dict(attn_kind="mla", n_kv_head=4, attn_options=dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                                                          v_head_dim=32))


@pytest.mark.parametrize("fmt,kind", [(f, k) for f in ("fp8", "int8", "int4") for k in ("gqa", "mla")]
                         + [("int8/int4", "gqa")])
def test_decoding_a_model_through_the_kernel_equals_decoding_the_cache_first(fmt, kind, monkeypatch):
    torch.manual_seed(0)
    model = make_model(d_model=128, n_head=4, n_kv_head=2) if kind == "gqa" else make_model(d_model=128, n_head=4,
                                                                                            **MLA)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12))
    calls = []
    kernel = quantized_cpu.quantized_decode

    def counted(*a, **kw):
        calls.append(1)
        return kernel(*a, **kw)

    def run(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(quantized_cpu, "quantized_decode", counted if fused else lambda *a, **kw: None)
        cache = model.new_cache(2, 20, kv_quant=parse_kv_quant(fmt))
        with torch.inference_mode():
            model(tokens[:, :8], cache=cache)
            return torch.cat([model(tokens[:, i:i + 1], cache=cache) for i in range(8, 12)], 1)

    via_kernel, decoded_first = run(True), run(False)
    assert len(calls) == 4 * model.cfg.n_layer          # every decode step of every layer
    torch.testing.assert_close(via_kernel, decoded_first, rtol=1e-5, atol=1e-5)


def test_a_ragged_batch_decodes_through_the_kernel_as_through_the_decoded_cache(monkeypatch):
    """Rows of different lengths (a left-padded prompt batch): the mask's per-row lengths reach the
    kernel, and the greedy continuations equal those of the path that decodes the cache first."""
    from kvlab.inference.generation import generate

    model = make_model(d_model=128, n_head=4, n_kv_head=2)
    prompts = [[5, 9, 13, 2, 7, 30, 31, 40], [3, 4], [8, 1, 5, 77, 6]]
    calls = []
    kernel = quantized_cpu.quantized_decode

    def counted(*a, **kw):
        calls.append(1)
        return kernel(*a, **kw)

    outs = []
    for fn in (counted, lambda *a, **kw: None):
        monkeypatch.setattr(quantized_cpu, "quantized_decode", fn)
        outs.append(generate(model, prompts, max_new_tokens=6, kv_quant="int8", temperature=0.0))
    assert calls and outs[0] == outs[1]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("width", [64, 96, 18, 176])
def test_the_compiled_quantizer_equals_the_reference_bit_for_bit(bits, width):
    """What a cache stores each step comes from the compiled quantizer on CPUs: the same codes and
    float16 parameters as kvlab.cache.quantized.quantize, including all-zero groups, values past
    float16's range and exact ties."""
    from kvlab.cache.quantized import quantize

    torch.manual_seed(bits + width)
    x = torch.randn(3, 2, 11, width) * torch.logspace(-3, 2, width) + 0.25
    x[0, 0, 0] = 0
    x[0, 0, 1, :8] = 1e6                              # a scale past float16's largest
    x[1, 1, 2] = torch.arange(width) % 16 * 0.5       # codes on exact halves
    native = quantized_cpu._quantize(x, bits)
    reference = quantize(x, bits)
    for got, want in zip(native, reference):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8) if got.dtype != torch.float16 else got.view(torch.int16),
                           want.view(torch.uint8) if want.dtype != torch.float16 else want.view(torch.int16))


@pytest.mark.parametrize("fmt", ["int4-h", "int8/int4-h"])
def test_a_rotated_cache_decodes_through_the_kernel_as_through_the_decoded_cache(fmt, monkeypatch):
    test_decoding_a_model_through_the_kernel_equals_decoding_the_cache_first(fmt, "gqa", monkeypatch)


def test_a_rotated_format_costs_its_plain_formats_bytes_and_needs_whole_blocks():
    from kvlab.config.accounting import cache_bytes
    from kvlab.errors import ConfigError

    cfg = make_model(d_model=128, n_head=4, n_kv_head=2).cfg
    assert cache_bytes(cfg, "bf16", "int4-h").per_token == cache_bytes(cfg, "bf16", "int4").per_token
    assert cache_bytes(cfg, "bf16", "int8/int4-h").per_token == cache_bytes(cfg, "bf16", "int8/int4").per_token
    with pytest.raises(ConfigError, match="rotates blocks of 32 channels"):
        cache_bytes(make_model(**MLA).cfg, "bf16", "int4-h")             # a 48-wide latent + RoPE key


def test_a_rotated_mla_cache_decodes_through_the_kernel_as_through_the_decoded_cache(monkeypatch):
    """MLA's entry (latent and RoPE key, 64 channels here) rotated as one vector: scores and the latent
    read back are the same through the kernel as through the decoded cache."""
    wide = dict(MLA, attn_options=dict(MLA["attn_options"], kv_lora_rank=48))
    monkeypatch.setitem(globals(), "MLA", wide)
    test_decoding_a_model_through_the_kernel_equals_decoding_the_cache_first("int4-h", "mla", monkeypatch)

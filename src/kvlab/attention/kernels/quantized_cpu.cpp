// Decode attention that reads a quantized KV cache directly (CPUs): the codes of each cached key
// and value are turned into floats in registers, 8 channels at a time, and used at once, so no float
// copy of the cache is ever written. Built at first use by kvlab.attention.kernels.quantized_cpu.
//
// Formats (kvlab.cache.quantized): 0 fp8 e4m3 (no parameters); 1 int8 q8_0 (a float16 scale per
// group of channels); 2 int4 q4_1 (codes packed two per byte, the even channel in the low nibble, and
// a float16 (scale, min) pair per group). A group is 32 channels, or the whole vector where its width
// is not a multiple of 32 (kvlab.dtypes.quant_group); the caller passes widths whose groups are a
// multiple of 8 (int8) or 16 (int4) channels.
//
// Each batch row's queries attend to its first lengths[b] cached keys (a decode step: every key of the
// row's sequence, the rest of a ragged batch's slots unused); the caller checks that the mask is that.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define KVLAB_X86 1
#endif

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr float FP8_FIX = 256.f;  // fp8_to_f gives 2^-8 of each value

inline v8f loadf(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void storef(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

#ifdef KVLAB_X86
inline v8i u8_to_i(const uint8_t* p) { return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
inline v8f i8_to_f(const uint8_t* p) {
  return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
// e4m3 -> float16 bits: the byte sign-extended and moved up 7 places puts exponent and mantissa
// where float16 keeps them and the sign in bit 15 (bit 14, set by the extension, is cleared). That
// reads as a number 2^8 too small (the exponent biases are 7 and 15), a factor the callers apply once
// per row; float16 holds every e4m3 value, subnormals included, and the conversion is exact.
inline v8f fp8_to_f(const uint8_t* p) {
  const __m128i x = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)p));
  return (v8f)_mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(x, 7), _mm_set1_epi16(0xBFFF)));
}
inline float h2f(const at::Half* p) { return _cvtsh_ss(p->x); }
#else
inline v8i u8_to_i(const uint8_t* p) { v8i r; for (int i = 0; i < 8; ++i) r[i] = p[i]; return r; }
inline v8f i8_to_f(const uint8_t* p) { v8f r; for (int i = 0; i < 8; ++i) r[i] = static_cast<int8_t>(p[i]); return r; }
inline v8f fp8_to_f(const uint8_t* p) {   // 2^-8 of the value, as the vector version
  v8f r;
  for (int i = 0; i < 8; ++i)
    r[i] = static_cast<float>(c10::Float8_e4m3fn(p[i], c10::Float8_e4m3fn::from_bits())) * (1.f / 256.f);
  return r;
}
inline float h2f(const at::Half* p) { return static_cast<float>(*p); }
#endif

// Where the u-th 8-channel vector of a cached entry of width W lives. fp8 and int8: bytes 8u.. and
// channels 8u.. in order. int4: a group of G channels is G/2 bytes, the even channels in the low
// nibbles; its vectors are the low nibbles of its bytes, then the high ones — so vector u holds
// channels in the order "even then odd" within its group, and a query (scores) or an output (values)
// uses that order too. `group` is the vector's parameter group.
struct Layout {
  std::vector<int64_t> byte, group;
  std::vector<char> high;
  Layout(int fmt, int64_t W, int64_t G) : byte(W / 8), group(W / 8), high(W / 8, 0) {
    for (int64_t u = 0; u < W / 8; ++u) {
      if (fmt == 2) {
        const int64_t per = G / 8, g = u / per, w = u % per;
        group[u] = g;
        high[u] = w >= per / 2;
        byte[u] = g * G / 2 + 8 * (w % (per / 2));
      } else {
        byte[u] = 8 * u;
        group[u] = fmt == 1 ? 8 * u / G : 0;
      }
    }
  }
};

// The u-th vector of one token's entry, as values (fp8: 2^-8 of them, see fp8_to_f).
template <int FMT>
inline v8f decode_vec(const uint8_t* c, const at::Half* p, const Layout& L, int64_t u) {
  if (FMT == 0) return fp8_to_f(c + L.byte[u]);
  if (FMT == 1) return i8_to_f(c + L.byte[u]) * splat(h2f(p + L.group[u]));
  const v8i b = u8_to_i(c + L.byte[u]);
  const v8f n = __builtin_convertvector(L.high[u] ? b >> 4 : b & 15, v8f);
  const int64_t g = L.group[u];
  return n * splat(h2f(p + 2 * g)) + splat(h2f(p + 2 * g + 1));
}

struct Rows {                 // one (batch row, KV head)'s cached codes and parameters
  const uint8_t* codes;
  int64_t code_stride;        // bytes from one token to the next
  const at::Half* params;
  int64_t param_stride;
};

// Softmax of each row of s[R][T], in place.
void softmax_rows(float* s, int64_t R, int64_t T) {
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * T;
    const float m = *std::max_element(sr, sr + T);
    float sum = 0.f;
    for (int64_t t = 0; t < T; ++t) { sr[t] = std::exp(sr[t] - m); sum += sr[t]; }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < T; ++t) sr[t] *= inv;
  }
}

// Scores s[r][t] = q[r] . k[t] for RB query rows at once (q in the layout's channel order, already
// scaled): each key vector is decoded once and used by every row, whose sums stay in registers.
template <int FMT, int RB>
void scores(const float* q, int64_t D, int64_t T, const Rows& k, const Layout& L, float* s, int64_t s_stride) {
  const int64_t nv = D / 8;
  const float fix = FMT == 0 ? FP8_FIX : 1.f;
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* c = k.codes + t * k.code_stride;
    const at::Half* p = k.params ? k.params + t * k.param_stride : nullptr;
    v8f acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = splat(0.f);
    for (int64_t u = 0; u < nv; ++u) {
      const v8f x = decode_vec<FMT>(c, p, L, u);
      for (int r = 0; r < RB; ++r) acc[r] += loadf(q + r * D + 8 * u) * x;
    }
    for (int r = 0; r < RB; ++r) s[r * s_stride + t] = fix * hsum(acc[r]);
  }
}

// o[r] += sum_t w[r][t] v[t] for RB rows at once (o in the layout's channel order): blocks of tokens
// that stay in the L1 cache, each vector of the outputs accumulated in registers over the block.
template <int FMT, int RB>
void weighted_values(const float* w, int64_t w_stride, int64_t Dv, int64_t T, const Rows& v, const Layout& L,
                     float* o) {
  constexpr int64_t TB = 64;
  const int64_t nv = Dv / 8;
  for (int64_t t0 = 0; t0 < T; t0 += TB) {
    const int64_t t1 = std::min(T, t0 + TB);
    for (int64_t u = 0; u < nv; ++u) {
      v8f acc[RB];
      for (int r = 0; r < RB; ++r) acc[r] = loadf(o + r * Dv + 8 * u);
      for (int64_t t = t0; t < t1; ++t) {
        const v8f x = decode_vec<FMT>(v.codes + t * v.code_stride, v.params ? v.params + t * v.param_stride : nullptr,
                                      L, u);
        for (int r = 0; r < RB; ++r) acc[r] += splat(w[r * w_stride + t]) * x;
      }
      for (int r = 0; r < RB; ++r) storef(o + r * Dv + 8 * u, acc[r]);
    }
  }
}

template <int KF, int VF, int RB>
void attend_rows(const float* q, int64_t D, int64_t Dv, int64_t T, const Rows& k, const Rows& v, const Layout& Lk,
                 const Layout& Lv, float* o, float* s) {
  scores<KF, RB>(q, D, T, k, Lk, s, T);
  softmax_rows(s, RB, T);
  std::fill(o, o + RB * Dv, 0.f);
  weighted_values<VF, RB>(s, T, Dv, T, v, Lv, o);
}

// R query rows in chunks of at most 8 (the register budget), each chunk by its own instantiation; keys
// in format KF, values in VF (the same but for a mixed cache, int8 keys with int4 values).
template <int KF, int VF>
void attend(const float* q, int64_t R, int64_t D, int64_t Dv, int64_t T, const Rows& k, const Rows& v,
            const Layout& Lk, const Layout& Lv, float* o, float* s) {
  for (int64_t r0 = 0; r0 < R; r0 += 8) {
    const int64_t rb = std::min<int64_t>(8, R - r0);
    const float* qc = q + r0 * D;
    float* oc = o + r0 * Dv;
    switch (rb) {
      case 1: attend_rows<KF, VF, 1>(qc, D, Dv, T, k, v, Lk, Lv, oc, s); break;
      case 2: attend_rows<KF, VF, 2>(qc, D, Dv, T, k, v, Lk, Lv, oc, s); break;
      case 3: attend_rows<KF, VF, 3>(qc, D, Dv, T, k, v, Lk, Lv, oc, s); break;
      case 4: attend_rows<KF, VF, 4>(qc, D, Dv, T, k, v, Lk, Lv, oc, s); break;
      case 5: attend_rows<KF, VF, 5>(qc, D, Dv, T, k, v, Lk, Lv, oc, s); break;
      case 6: attend_rows<KF, VF, 6>(qc, D, Dv, T, k, v, Lk, Lv, oc, s); break;
      case 7: attend_rows<KF, VF, 7>(qc, D, Dv, T, k, v, Lk, Lv, oc, s); break;
      default: attend_rows<KF, VF, 8>(qc, D, Dv, T, k, v, Lk, Lv, oc, s); break;
    }
  }
}

template <int KF>
void attend_keys_as(int64_t vfmt, const float* q, int64_t R, int64_t D, int64_t Dv, int64_t T, const Rows& k,
                    const Rows& v, const Layout& Lk, const Layout& Lv, float* o, float* s) {
  if (vfmt == 0) attend<KF, 0>(q, R, D, Dv, T, k, v, Lk, Lv, o, s);
  else if (vfmt == 1) attend<KF, 1>(q, R, D, Dv, T, k, v, Lk, Lv, o, s);
  else attend<KF, 2>(q, R, D, Dv, T, k, v, Lk, Lv, o, s);
}

// A row of width W from the layout's channel order (int4: even-then-odd per group) to the natural one,
// or (to_layout) the other way.
void permute_row(float* x, int64_t W, int64_t G, bool to_layout) {
  std::vector<float> tmp(x, x + W);
  for (int64_t g = 0; g < W / G; ++g)
    for (int64_t i = 0; i < G / 2; ++i) {
      float* even = x + g * G + (to_layout ? i : 2 * i);
      float* odd = x + g * G + (to_layout ? G / 2 + i : 2 * i + 1);
      *even = tmp[g * G + (to_layout ? 2 * i : i)];
      *odd = tmp[g * G + (to_layout ? 2 * i + 1 : G / 2 + i)];
    }
}

Rows rows_of(const torch::Tensor& codes, const torch::Tensor& params, int64_t b, int64_t h, int64_t fmt) {
  Rows r{reinterpret_cast<const uint8_t*>(codes.data_ptr()) + b * codes.stride(0) + h * codes.stride(1),
         codes.stride(2), nullptr, 0};
  if (fmt != 0) {
    r.params = params.data_ptr<at::Half>() + b * params.stride(0) + h * params.stride(1);
    r.param_stride = params.stride(2);
  }
  return r;
}

// fmt's parameters per vector of width W give its group: W / scales (int8), 2 W / (scale, min) (int4).
int64_t group_of(const torch::Tensor& params, int64_t fmt, int64_t width) {
  return fmt == 0 ? 8 : (fmt == 1 ? width : 2 * width) / params.size(3);
}

}  // namespace

// q (B, H, R, D) float32 (R query rows per KV head, multiplied by the softmax scale by the caller);
// k_codes (B, H, T, ·) uint8 views with a contiguous last dimension, k_params (B, H, T, ·) float16 or
// empty (fp8), in format kfmt; the same for v in vfmt; lengths (B,) int64, each at most T. Returns
// (B, H, R, Dv) float32 (zeros for a row with no keys).
torch::Tensor quantized_decode(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_params,
                               torch::Tensor v_codes, torch::Tensor v_params, torch::Tensor lengths, int64_t kfmt,
                               int64_t vfmt, int64_t Dv) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous(), "q must be contiguous float32");
  TORCH_CHECK(kfmt >= 0 && kfmt <= 2 && vfmt >= 0 && vfmt <= 2, "unknown format");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), T = k_codes.size(2);
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.numel() == B, "lengths must be (B,) int64");
  const int64_t Gk = group_of(k_params, kfmt, D), Gv = group_of(v_params, vfmt, Dv);
  TORCH_CHECK(D % Gk == 0 && Dv % Gv == 0 && Gk % (kfmt == 2 ? 16 : 8) == 0 && Gv % (vfmt == 2 ? 16 : 8) == 0,
              "widths must be whole groups of 8 (int4: 16) channels");
  const Layout Lk(kfmt, D, Gk), Lv(vfmt, Dv, Gv);
  if (kfmt == 2) {            // queries into the keys' channel order
    q = q.clone();
    float* qd = q.data_ptr<float>();
    for (int64_t i = 0; i < B * H * R; ++i) permute_row(qd + i * D, D, Gk, true);
  }
  const auto lengths_c = lengths.contiguous();
  const int64_t* len = lengths_c.data_ptr<int64_t>();
  auto out = torch::empty({B, H, R, Dv}, q.options());
  const float* qd = q.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(8 * std::max<int64_t>(T, 1));
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Rows k = rows_of(k_codes, k_params, b, h, kfmt), v = rows_of(v_codes, v_params, b, h, vfmt);
      const float* qb = qd + bh * R * D;
      float* ob = od + bh * R * Dv;
      const int64_t Tb = std::min(std::max<int64_t>(len[b], 0), T);
      if (Tb == 0) { std::fill(ob, ob + R * Dv, 0.f); continue; }
      if (kfmt == 0) attend_keys_as<0>(vfmt, qb, R, D, Dv, Tb, k, v, Lk, Lv, ob, s.data());
      else if (kfmt == 1) attend_keys_as<1>(vfmt, qb, R, D, Dv, Tb, k, v, Lk, Lv, ob, s.data());
      else attend_keys_as<2>(vfmt, qb, R, D, Dv, Tb, k, v, Lk, Lv, ob, s.data());
      if (vfmt == 0)
        for (int64_t i = 0; i < R * Dv; ++i) ob[i] *= FP8_FIX;
      if (vfmt == 2)
        for (int64_t r = 0; r < R; ++r) permute_row(ob + r * Dv, Dv, Gv, false);
    }
  });
  return out;
}


// Rows x (N, W) float32 into codes and float16 parameters exactly as kvlab.cache.quantized.quantize
// computes them (the same float32 operations, round half to even): int8 (N, W) codes and a scale
// absmax / 127 per group; int4 (N, W / 2) bytes, the even channel in the low nibble, and (scale, min)
// per group, scale = (max - min) / 15. One call per layer and step instead of some 25 small tensor
// operations, which were most of what a 512-token int4 decode step spent on its cache.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, int64_t bits, int64_t G) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be (N, W) float32");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  x = x.contiguous();
  const int64_t N = x.size(0), W = x.size(1), ng = W / G;
  TORCH_CHECK(W % G == 0 && (bits == 8 || G % 2 == 0), "bad group");
  const float F16_MAX = 65504.f;
  auto codes = torch::empty({N, bits == 8 ? W : W / 2}, x.options().dtype(bits == 8 ? torch::kInt8 : torch::kUInt8));
  auto params = torch::empty({N, bits == 8 ? ng : 2 * ng}, x.options().dtype(torch::kFloat16));
  const float* xd = x.data_ptr<float>();
  at::Half* pd = params.data_ptr<at::Half>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < ng; ++g) {
      const float* v = xd + n * W + g * G;
      if (bits == 8) {
        float amax = 0.f;
        for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::fabs(v[i]));
        const at::Half scale(std::min(amax / 127.f, F16_MAX));
        float sc = static_cast<float>(scale);
        sc = sc > 0.f ? sc : 1.f;
        int8_t* c = codes.data_ptr<int8_t>() + n * W + g * G;
        for (int64_t i = 0; i < G; ++i)
          c[i] = static_cast<int8_t>(std::min(127.f, std::max(-128.f, std::nearbyint(v[i] / sc))));
        pd[n * ng + g] = scale;
      } else {
        float lo = v[0], hi = v[0];
        for (int64_t i = 1; i < G; ++i) { lo = std::min(lo, v[i]); hi = std::max(hi, v[i]); }
        const at::Half low(std::min(F16_MAX, std::max(-F16_MAX, lo)));
        const float lowf = static_cast<float>(low);
        const at::Half scale(std::min((hi - lowf) / 15.f, F16_MAX));
        float sc = static_cast<float>(scale);
        sc = sc > 0.f ? sc : 1.f;
        uint8_t* c = codes.data_ptr<uint8_t>() + n * (W / 2) + g * G / 2;
        for (int64_t i = 0; i < G / 2; ++i) {
          const int a = static_cast<int>(std::min(15.f, std::max(0.f, std::nearbyint((v[2 * i] - lowf) / sc))));
          const int b = static_cast<int>(std::min(15.f, std::max(0.f, std::nearbyint((v[2 * i + 1] - lowf) / sc))));
          c[i] = static_cast<uint8_t>(a | (b << 4));
        }
        pd[n * 2 * ng + 2 * g] = scale;
        pd[n * 2 * ng + 2 * g + 1] = low;
      }
    }
  return {codes, params};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_decode", &quantized_decode, "decode attention over a quantized KV cache");
  m.def("quantize_rows", &quantize_rows, "int8/int4 codes and float16 parameters of float32 rows");
}

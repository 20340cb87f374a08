// CPU kernels: T3 decode's weight-only low-precision linears and single-query attention, S3Gen estimator's full
// self-attention and fused LayerNorm / Mish / GELU passes, and the quantise / dequantise passes of the estimator's
// opt-in int8 GEMMs (sections below).
//
// Weight-only low-precision linears for T3's decode step on CPU: y (M, N) = x (M, K) @ dequant(w (N, K))^T.
//
// Decoding one token at batch 2 (CFG) reads every weight once and does 2 FMAs with it, so the step is bound by
// weight bytes. These kernels read the weight in its stored dtype (int8 with per-output-channel scales, or bf16),
// widen each 16 (AVX-512) or 8 (AVX2) values to fp32 in registers and accumulate in fp32: the activations are not
// rounded (ATen's `_weight_int8pack_mm` needs bf16 activations on CPU) and no dequantised copy is written.
//
// Layout: row-major (N, K) weights, as nn.Linear stores them. Work split: blocks of NB output channels over the
// ATen thread pool (at::parallel_for, the same OpenMP runtime as torch); inside a block, rows of x in pairs, so each
// widened weight vector feeds two FMAs (decode's CFG pair) and NB x 2 accumulators hide the FMA latency.
// The ISA is chosen at build time (-mavx512f... or -mavx2 -mfma; neither: portable scalar loop).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__GNUC__) && defined(__linux__)
#include <cpuid.h>  // the AMX check of the bf16 attention (cpuid, arch_prctl)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// ---- vector helpers shared by the kernels below: one Isa struct per build (AVX-512: 16 floats, AVX2: 8) -------
namespace dec {
// AVX512-VNNI on this CPU (AVX-512 builds), unless CHATTERBOX_FAST_CPU_VNNI=0: then the kernels run as on a CPU
// without it (tests: the int8 linear's vpmaddwd form, int8 attention's portable path)
inline bool cpu_has_vnni() {
#if defined(__AVX512F__) && defined(__GNUC__)
  static const bool yes = [] {
    const char* env = std::getenv("CHATTERBOX_FAST_CPU_VNNI");
    if (env != nullptr && env[0] == '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

#if defined(__AVX512F__)
inline __m512 exp2_ps(__m512 x) {  // 2^x for x <= 0; relative error ~1e-7 (degree-6 polynomial on [-0.5, 0.5])
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif
}  // namespace dec

#if defined(__AVX512F__)
struct Isa {
  using V = __m512;
  static constexpr int L = 16, KW = 32, QR = 12, PR = 6, PW = 64;  // PW: PV tile width (columns of D)
  static V zero() { return _mm512_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V select_nonneg(V x, V a, V b) {  // x >= 0 ? a : b, per lane
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
  }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale2(V x, V n) { return _mm512_scalef_ps(x, n); }  // x * 2^n, n integral
  static V recip(V x) {  // 1 / x for normal x > 0: 14-bit estimate + one Newton step (~1 ulp)
    const V r = _mm512_rcp14_ps(x);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.f)));
  }
  static V abs(V x) { return _mm512_andnot_ps(_mm512_set1_ps(-0.f), x); }
  static float reduce_max(V x) { return _mm512_reduce_max_ps(x); }
  static V exp2(V x) { return dec::exp2_ps(x); }
  // The sum of the 16 lanes, always in this order (GCC's _mm512_reduce_add_ps tree, spelt out so that every compiler
  // sums alike and reduce_add8 can match it): lanes i + i+8, then i + i+4, then i + i+2, then lane 0 + lane 1.
  static float reduce_add(V x) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
    const __m256 a = _mm256_add_ps(hi, _mm512_castps512_ps256(x));
    const __m128 b = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    const __m128 c = _mm_add_ps(b, _mm_shuffle_ps(b, b, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, _MM_SHUFFLE(1, 1, 1, 1))));
  }
  // out[j] = reduce_add(v[j]) for j < 8, bit for bit (the same pairs summed), as one transposed tree: 16 shuffles and
  // 8 adds instead of 8 x (4 + 4). The multi-row linears end every block of 8 channels with it.
  static void reduce_add8(const V* v, float* out) {
    V t[4], u[2];
    for (int i = 0; i < 4; ++i)  // lanes i + i+8: low half of v[2i] | of v[2i + 1]
      t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE),
                           _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44));
    for (int i = 0; i < 2; ++i)  // quarter q: lanes i + i+4 of v[4i + q]
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD),
                           _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88));
    // quarter q: lanes 0 + 2, 1 + 3 of v[q], then of v[q + 4]
    const V w = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)),
                              _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)));
    // quarter q: lane 0 = v[q]'s sum, lane 1 = v[q + 4]'s
    const V r = _mm512_add_ps(_mm512_shuffle_ps(w, w, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_ps(w, w, _MM_SHUFFLE(3, 1, 3, 1)));
    alignas(64) float f[16];
    _mm512_store_ps(f, r);
    for (int q = 0; q < 4; ++q) {
      out[q] = f[4 * q];
      out[q + 4] = f[4 * q + 1];
    }
  }
  static __mmask16 mask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
  static V load_tail(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static V keep_first(V x, int64_t n) { return _mm512_maskz_mov_ps(mask(n), x); }  // lanes >= n zeroed
  static void store_tail(float* p, V x, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), x); }
  static void transpose(V* r) {  // r[i][j] -> r[j][i], 16 x 16 (64 shuffles)
    V t[16];
    for (int g = 0; g < 16; g += 4) {  // 4 x 4 transposes within each 128-bit lane
      const V a = _mm512_unpacklo_ps(r[g], r[g + 1]), b = _mm512_unpackhi_ps(r[g], r[g + 1]);
      const V c = _mm512_unpacklo_ps(r[g + 2], r[g + 3]), d = _mm512_unpackhi_ps(r[g + 2], r[g + 3]);
      t[g] = _mm512_shuffle_ps(a, c, 0x44);
      t[g + 1] = _mm512_shuffle_ps(a, c, 0xEE);
      t[g + 2] = _mm512_shuffle_ps(b, d, 0x44);
      t[g + 3] = _mm512_shuffle_ps(b, d, 0xEE);
    }
    for (int c = 0; c < 4; ++c) {  // then the 4 x 4 grid of 128-bit lanes of t[c], t[4 + c], t[8 + c], t[12 + c]
      const V x0 = _mm512_shuffle_f32x4(t[c], t[4 + c], 0x44), x1 = _mm512_shuffle_f32x4(t[c], t[4 + c], 0xEE);
      const V y0 = _mm512_shuffle_f32x4(t[8 + c], t[12 + c], 0x44);
      const V y1 = _mm512_shuffle_f32x4(t[8 + c], t[12 + c], 0xEE);
      r[c] = _mm512_shuffle_f32x4(x0, y0, 0x88);
      r[4 + c] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
      r[8 + c] = _mm512_shuffle_f32x4(x1, y1, 0x88);
      r[12 + c] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
    }
  }
};
#elif defined(__AVX2__)
struct Isa {
  using V = __m256;
  static constexpr int L = 8, KW = 16, QR = 6, PR = 3, PW = 32;
  static V zero() { return _mm256_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V select_nonneg(V x, V a, V b) {  // x >= 0 ? a : b, per lane
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
  }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale2(V x, V n) {  // x * 2^n, n integral in [-126, 127]
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(x, _mm256_castsi256_ps(e));
  }
  static V recip(V x) {  // 1 / x for normal x > 0: 12-bit estimate + two Newton steps (~1 ulp)
    V r = _mm256_rcp_ps(x);
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.f)));
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.f)));
  }
  static V abs(V x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
  static float reduce_max(V x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static float reduce_add(V x) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
  }
  static V exp2(V x) {  // 2^x for x <= 0, as dec::exp2_ps: relative error ~1e-7, exactly 0 below 2^-126
    const __m256 lo = _mm256_set1_ps(-126.f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    return _mm256_andnot_ps(under, scale2(p, n));
  }
  static __m256i mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_tail(const float* p, int64_t n) { return _mm256_maskload_ps(p, mask(n)); }
  static V keep_first(V x, int64_t n) { return _mm256_and_ps(x, _mm256_castsi256_ps(mask(n))); }
  static void store_tail(float* p, V x, int64_t n) { _mm256_maskstore_ps(p, mask(n), x); }
  static void transpose(V* r) {  // r[i][j] -> r[j][i], 8 x 8
    V t[8];
    for (int g = 0; g < 8; g += 4) {  // 4 x 4 transposes within each 128-bit lane
      const V a = _mm256_unpacklo_ps(r[g], r[g + 1]), b = _mm256_unpackhi_ps(r[g], r[g + 1]);
      const V c = _mm256_unpacklo_ps(r[g + 2], r[g + 3]), d = _mm256_unpackhi_ps(r[g + 2], r[g + 3]);
      t[g] = _mm256_shuffle_ps(a, c, 0x44);
      t[g + 1] = _mm256_shuffle_ps(a, c, 0xEE);
      t[g + 2] = _mm256_shuffle_ps(b, d, 0x44);
      t[g + 3] = _mm256_shuffle_ps(b, d, 0xEE);
    }
    for (int c = 0; c < 4; ++c) {  // then swap the off-diagonal 128-bit halves
      r[c] = _mm256_permute2f128_ps(t[c], t[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(t[c], t[4 + c], 0x31);
    }
  }
};
#endif

constexpr int64_t NB = 8;  // output channels per block (8 x 2 accumulators; 2/4/8 alike with the prefetch below)
#if defined(__AVX512F__)
static_assert(NB == 8, "the multi-row linears end a block with Isa::reduce_add8");
#endif

struct Int8Weight {
  using T = int8_t;
#if defined(__AVX512F__)
  static inline __m512 load(const T* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
#elif defined(__AVX2__)
  static inline __m256 load(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#endif
  static inline float load1(const T* p) { return static_cast<float>(*p); }
};

struct Bf16Weight {  // bf16 bits are the top half of an fp32: widen = shift left by 16
  using T = uint16_t;
#if defined(__AVX512F__)
  static inline __m512 load(const T* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
#elif defined(__AVX2__)
  static inline __m256 load(const T* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
#endif
  static inline float load1(const T* p) {
    const uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct F32Weight {  // plain fp32 rows (the decode attention's fp32 KV cache)
  using T = float;
#if defined(__AVX512F__)
  static inline __m512 load(const T* p) { return _mm512_loadu_ps(p); }
#elif defined(__AVX2__)
  static inline __m256 load(const T* p) { return _mm256_loadu_ps(p); }
#endif
  static inline float load1(const T* p) { return *p; }
};

// a * b + c for the scalar K tails of the linears: one fused multiply-add in the SIMD builds, so that the pair path
// and the multi-row path round a tail alike (the compiler would contract some of them and not others)
inline float tail_madd(float a, float b, float c) {
#if defined(__AVX512F__) || defined(__AVX2__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// s0[j] = sum_k x0[k] * w[j * K + k], s1[j] likewise with x1, for j < B.
//
// Software prefetch of the *next* block: while one block of B rows streams in, each 64-byte line read here issues a
// prefetch of the line at the same offset B rows further on (B * K elements ahead). The hardware prefetchers stop at
// 4 KB page boundaries and only see the current rows; without this the kernel streamed at ~65-70 % of a plain read
// of the same bytes (compute and DRAM latency did not overlap), with it at ~85-95 % (measured on T3's shapes,
// 2 threads; a prefetch only 256-2048 bytes ahead within the current rows had gained nothing). Prefetches never
// fault, so the last block's run past the weight's end is harmless.
template <class W, int64_t B>
inline void dot_block(const float* x0, const float* x1, const typename W::T* w, int64_t K, float* s0, float* s1) {
  using T = typename W::T;
  constexpr int64_t LINE = 64 / sizeof(T);  // elements per cache line
  const uintptr_t next = reinterpret_cast<uintptr_t>(w) + B * K * sizeof(T);  // an address, maybe past the end
  int64_t k = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  using V = Isa::V;
  constexpr int64_t L = Isa::L;
  V a0[B], a1[B];
  for (int64_t j = 0; j < B; ++j) a0[j] = a1[j] = Isa::zero();
  auto step = [&](int64_t kk) {  // L elements of each row
    const V v0 = Isa::load(x0 + kk), v1 = Isa::load(x1 + kk);
    for (int64_t j = 0; j < B; ++j) {
      const V wv = W::load(w + j * K + kk);  // widened to fp32
      a0[j] = Isa::fma(v0, wv, a0[j]);
      a1[j] = Isa::fma(v1, wv, a1[j]);
    }
  };
  for (; k + LINE <= K; k += LINE) {
    for (int64_t j = 0; j < B; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(next + (j * K + k) * sizeof(T)), _MM_HINT_T0);
    }
    for (int64_t kk = 0; kk < LINE; kk += L) step(k + kk);
  }
  for (; k + L <= K; k += L) step(k);
  for (int64_t j = 0; j < B; ++j) {
    s0[j] = Isa::reduce_add(a0[j]);
    s1[j] = Isa::reduce_add(a1[j]);
  }
#else
  (void)next;
  (void)LINE;
  for (int64_t j = 0; j < B; ++j) s0[j] = s1[j] = 0.f;
#endif
  for (; k < K; ++k) {  // tail (all of K without SIMD)
    for (int64_t j = 0; j < B; ++j) {
      const float wv = W::load1(w + j * K + k);
      s0[j] = tail_madd(x0[k], wv, s0[j]);
      s1[j] = tail_madd(x1[k], wv, s1[j]);
    }
  }
}

// More rows per weight load, for M > 2 (the speculative decoder's verification: 2 k rows). Per block of NB output
// channels the M x NB accumulators live in a small buffer (acc[m * NB + j]) while K goes by in chunks of KC: each
// chunk of the block's weights (8 KB fp32) and of every x row stays in L1 while all row tiles use it, and the
// tiles (R <= kRowTile rows x C <= NR channels: AVX-512 6 x 4, AVX2 3 x 4) keep their accumulators, R x vectors and
// one weight vector in registers. Each accumulator's FMAs run in dot_block's order (k ascending in steps of L, then
// the same reduction and scalar tail; storing and reloading an accumulator changes nothing), so a row's result does
// not depend on how many rows share the call: bit-identical to the one-token step. A full block (8 channels, no scalar
// K tail) ends with Isa::reduce_add8, the same sums as 8 reduce_adds in one transposed tree: at M = 12-16 the 8 x 7
// shuffles and adds per row had been ~10 % of the block's time (hot in L2: 80 -> 92 GFLOP/s per core at M = 16).
#if defined(__AVX512F__)
constexpr int kRowTile = 6;
#elif defined(__AVX2__)
constexpr int kRowTile = 3;
#endif
constexpr int64_t NR = 4;    // weight rows per tile
constexpr int64_t KC = 256;  // K chunk

#if defined(__AVX512F__) || defined(__AVX2__)
// acc[r * NB + j] += x_r[k0:k1] . w_j[k0:k1] for r < R, j < C (rows of w at w + j * K); `prefetch`: the lines of the
// rows NB further on (the next block), as dot_block does. Not inlined: inlined into linear_kernel_rows' loop, GCC
// shared the x loads of neighbouring tiles through stack spills (6 stores and reloads per step); as a function of
// its own the step is 10 loads and 24 FMAs. Measured 1.05-1.15x on T3's check (M = 12, 30 layers, 2 threads).
template <class W, int64_t C, int R>
__attribute__((noinline)) void tile_chunk(const float* const* xr, const typename W::T* w, int64_t K, int64_t k0,
                                          int64_t k1, Isa::V* acc, bool prefetch) {
  using T = typename W::T;
  using V = Isa::V;
  constexpr int64_t LINE = 64 / sizeof(T), L = Isa::L;
  const uintptr_t next = reinterpret_cast<uintptr_t>(w) + NB * K * sizeof(T);
  V a[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int64_t j = 0; j < C; ++j) a[r][j] = acc[r * NB + j];
  for (int64_t k = k0; k < k1; k += L) {  // no lambda here: GCC then keeps the accumulators in registers
    if (prefetch && k % LINE == 0) {
#pragma GCC unroll 8
      for (int64_t j = 0; j < C; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(next + (j * K + k) * sizeof(T)), _MM_HINT_T0);
      }
    }
    V xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      xv[r] = Isa::load(xr[r] + k);
      asm("" : "+v"(xv[r]));  // in a register: GCC would otherwise fold a load of x into every FMA (C x R loads)
    }
#pragma GCC unroll 8
    for (int64_t j = 0; j < C; ++j) {
      const V wv = W::load(w + j * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r][j] = Isa::fma(xv[r], wv, a[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int64_t j = 0; j < C; ++j) acc[r * NB + j] = a[r][j];
}

template <class W, int R>
inline void tile_rows(const float* const* xr, const typename W::T* w, int64_t K, int64_t k0, int64_t k1, int64_t nr,
                      Isa::V* acc, bool prefetch) {
  if (nr == NR) return tile_chunk<W, NR, R>(xr, w, K, k0, k1, acc, prefetch);
  for (int64_t j = 0; j < nr; ++j) tile_chunk<W, 1, R>(xr, w + j * K, K, k0, k1, acc + j, false);
}

template <class W>
void tile_rows_any(int R, const float* const* xr, const typename W::T* w, int64_t K, int64_t k0, int64_t k1,
                   int64_t nr, Isa::V* acc, bool prefetch) {
  switch (R) {
    case 1: return tile_rows<W, 1>(xr, w, K, k0, k1, nr, acc, prefetch);
    case 2: return tile_rows<W, 2>(xr, w, K, k0, k1, nr, acc, prefetch);
    case 3: return tile_rows<W, 3>(xr, w, K, k0, k1, nr, acc, prefetch);
#if defined(__AVX512F__)
    case 4: return tile_rows<W, 4>(xr, w, K, k0, k1, nr, acc, prefetch);
    case 5: return tile_rows<W, 5>(xr, w, K, k0, k1, nr, acc, prefetch);
    case 6: return tile_rows<W, 6>(xr, w, K, k0, k1, nr, acc, prefetch);
#endif
    default: TORCH_CHECK(false, "tile_rows_any: bad row count ", R);
  }
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// y[m][n0 + j] = reduce_add(acc[m * NB + j]) * scale[n0 + j] (scale may be null) for j < NB, m < M: a full block of
// the multi-row linears; AVX-512 reduces its 8 channels at once (reduce_add8, the same sums)
inline void store_block(const Isa::V* acc, int64_t M, const float* scale, float* y, int64_t N, int64_t n0) {
  for (int64_t m = 0; m < M; ++m) {
    float sums[NB];
#if defined(__AVX512F__)
    Isa::reduce_add8(acc + m * NB, sums);
#else
    for (int64_t j = 0; j < NB; ++j) sums[j] = Isa::reduce_add(acc[m * NB + j]);
#endif
    for (int64_t j = 0; j < NB; ++j) y[m * N + n0 + j] = sums[j] * (scale ? scale[n0 + j] : 1.f);
  }
}
#endif

// linear_kernel for M > 2 (see above)
template <class W>
void linear_kernel_rows(const float* x, const typename W::T* w, const float* scale, float* y, int64_t M, int64_t N,
                        int64_t K) {
  const int64_t nblocks = (N + NB - 1) / NB;
  at::parallel_for(0, nblocks, 4, [&](int64_t b0, int64_t b1) {
#if defined(__AVX512F__) || defined(__AVX2__)
    constexpr int64_t L = Isa::L;
    const int64_t Kv = K / L * L;  // the vector part; the rest as dot_block's scalar tail
    std::vector<Isa::V> acc;
    const float* xr[kRowTile];
#endif
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nb = std::min(NB, N - n0);
      const typename W::T* wb = w + n0 * K;
      int64_t k = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
      acc.assign(static_cast<size_t>(M * NB), Isa::zero());
      for (int64_t k0 = 0; k0 < Kv; k0 += KC) {
        const int64_t k1 = std::min(Kv, k0 + KC);
        for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
          const int R = static_cast<int>(std::min<int64_t>(kRowTile, M - m0));
          for (int r = 0; r < R; ++r) xr[r] = x + (m0 + r) * K;
          for (int64_t j0 = 0; j0 < nb; j0 += NR)
            tile_rows_any<W>(R, xr, wb + j0 * K, K, k0, k1, std::min(NR, nb - j0), acc.data() + m0 * NB + j0,
                             m0 == 0 && nb == NB);
        }
      }
      k = Kv;
      if (nb == NB && k == K) {  // a full block without a scalar tail
        store_block(acc.data(), M, scale, y, N, n0);
        continue;
      }
#endif
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < nb; ++j) {
#if defined(__AVX512F__) || defined(__AVX2__)
          float sum = Isa::reduce_add(acc[m * NB + j]);
#else
          float sum = 0.f;
#endif
          for (int64_t kk = k; kk < K; ++kk) sum = tail_madd(x[m * K + kk], W::load1(wb + j * K + kk), sum);
          y[m * N + n0 + j] = sum * (scale ? scale[n0 + j] : 1.f);
        }
    }
  });
}

// y (M, N) = x (M, K) @ w (N, K)^T [* scale (N,)], fp32 accumulation.
template <class W>
void linear_kernel(const float* x, const typename W::T* w, const float* scale, float* y, int64_t M, int64_t N,
                   int64_t K) {
  if (M > 2) return linear_kernel_rows<W>(x, w, scale, y, M, N, K);
  const int64_t nblocks = (N + NB - 1) / NB;
  at::parallel_for(0, nblocks, 4, [&](int64_t b0, int64_t b1) {
    float s0[NB], s1[NB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nb = std::min(NB, N - n0);
      for (int64_t m = 0; m < M; m += 2) {
        const bool pair = m + 1 < M;
        const float* x0 = x + m * K;
        const float* x1 = pair ? x0 + K : x0;  // odd M: the last row is computed twice, stored once
        if (nb == NB) {
          dot_block<W, NB>(x0, x1, w + n0 * K, K, s0, s1);
        } else {
          for (int64_t j = 0; j < nb; ++j) dot_block<W, 1>(x0, x1, w + (n0 + j) * K, K, s0 + j, s1 + j);
        }
        for (int64_t j = 0; j < nb; ++j) {
          const float sc = scale ? scale[n0 + j] : 1.f;
          y[m * N + n0 + j] = s0[j] * sc;
          if (pair) y[(m + 1) * N + n0 + j] = s1[j] * sc;
        }
      }
    }
  });
}

// Packed weights (int8 or bf16, `quantize.pack_weight`): the NB rows of a block stored chunk by chunk, one 64-byte
// line of each row in turn, w[((b * (K / LINE) + c) * NB + j) * LINE + e] = row b * NB + j, element c * LINE + e.
// A block is then one sequential stream (8 rows of 1-4 KB interleaved otherwise: several streams that cross a 4 KB
// page every few lines), prefetched PACKED_PREFETCH bytes ahead: 1.06-1.10x the row-major kernel on T3's int8 shapes at batch 2
// (measured, 2 threads; 256 bytes ahead was slower, 4-8 KB best). Same summation order: bit-identical outputs.
constexpr int64_t PACKED_PREFETCH = 4096;

#if defined(__AVX512F__) || defined(__AVX2__)
// One chunk of a packed block: the NB lines at c (elements k .. k + LINE of each row), prefetching `prefetch` bytes
// ahead, accumulated into a0 (row x0) and a1 (row x1) in k order
template <class W>
inline void packed_chunk(const float* x0, const float* x1, const typename W::T* c, int64_t k, int64_t prefetch,
                         Isa::V* a0, Isa::V* a1) {
  constexpr int64_t LINE = 64 / sizeof(typename W::T), L = Isa::L;
  for (int64_t j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(c + j * LINE) + prefetch, _MM_HINT_T0);
  for (int64_t kk = 0; kk < LINE; kk += L) {
    const Isa::V v0 = Isa::load(x0 + k + kk), v1 = Isa::load(x1 + k + kk);
    for (int64_t j = 0; j < NB; ++j) {
      const Isa::V wv = W::load(c + j * LINE + kk);
      a0[j] = Isa::fma(v0, wv, a0[j]);
      a1[j] = Isa::fma(v1, wv, a1[j]);
    }
  }
}
#endif

template <class W>
inline void dot_block_packed(const float* x0, const float* x1, const typename W::T* w, int64_t K, float* s0,
                             float* s1) {
  using T = typename W::T;
  constexpr int64_t LINE = 64 / sizeof(T);
#if defined(__AVX512F__) || defined(__AVX2__)
  Isa::V a0[NB], a1[NB];
  for (int64_t j = 0; j < NB; ++j) a0[j] = a1[j] = Isa::zero();
  for (int64_t k = 0; k < K; k += LINE) packed_chunk<W>(x0, x1, w + k * NB, k, PACKED_PREFETCH, a0, a1);
  for (int64_t j = 0; j < NB; ++j) {
    s0[j] = Isa::reduce_add(a0[j]);
    s1[j] = Isa::reduce_add(a1[j]);
  }
#else
  for (int64_t j = 0; j < NB; ++j) s0[j] = s1[j] = 0.f;
  for (int64_t k = 0; k < K; k += LINE)
    for (int64_t j = 0; j < NB; ++j)
      for (int64_t e = 0; e < LINE; ++e) {
        const float wv = W::load1(w + k * NB + j * LINE + e);
        s0[j] += x0[k + e] * wv;
        s1[j] += x1[k + e] * wv;
      }
#endif
}

#if defined(__AVX512F__)
// Several blocks in flight (AVX-512 builds): one weight stream per thread reads at ~20-22 GB/s on the 2-core VM,
// 4+ interleaved streams at ~28-31 GB/s (a plain read, measured). dot_block_packed's work for NS blocks at once, one
// line of each block's rows in turn, the accumulators of the blocks not in hand parked in an L1 buffer: every
// accumulator sees the same FMAs in the same order as in dot_block_packed (parking is a store and a reload), so
// the results are bit-identical. bf16 weights, all T3 shapes at batch 2: 36-38 ms against 45-47 ms (standalone).
constexpr int kPackedStreams = 4;
constexpr int64_t kStreamsPrefetch = 2048;  // bytes ahead within each block's stream

template <class W, int NS>
inline void dot_blocks_packed(const float* x0, const float* x1, const typename W::T* const* wb, int64_t K,
                              Isa::V (*park)[2 * NB]) {
  constexpr int64_t LINE = 64 / sizeof(typename W::T);
  for (int s = 0; s < NS; ++s)
    for (int64_t j = 0; j < 2 * NB; ++j) park[s][j] = Isa::zero();
  for (int64_t k = 0; k < K; k += LINE) {
    for (int s = 0; s < NS; ++s) {
      Isa::V a0[NB], a1[NB];
      for (int64_t j = 0; j < NB; ++j) {
        a0[j] = park[s][j];
        a1[j] = park[s][NB + j];
      }
      packed_chunk<W>(x0, x1, wb[s] + k * NB, k, kStreamsPrefetch, a0, a1);
      for (int64_t j = 0; j < NB; ++j) {
        park[s][j] = a0[j];
        park[s][NB + j] = a1[j];
      }
    }
  }
}
#endif

// linear_kernel_packed for M > 2 rows (the speculative decoder's check on bf16 weights, 2 k rows): every weight line
// is read once for all M rows (the M <= 2 path would stream the weights M / 2 times). Per block, K goes by in chunks
// of KPC: the block's chunk is widened to fp32 once into an L1 buffer (8 rows x KPC), then linear_kernel_rows' tiles
// (R rows x NR channels in registers) run over it for every row tile, so the widening is shared by all M rows
// (measured about as fast as widening in every row tile: at M = 12 the check is FMA-bound). Each accumulator sees
// dot_block_packed's FMAs in its order (k ascending in steps of L; the widened values are exact) and the same
// reduction, so every row's result is bit-identical to the M <= 2 path's.
#if defined(__AVX512F__) || defined(__AVX2__)
constexpr int64_t KPC = 256;

template <class W>
void linear_kernel_packed_rows(const float* x, const typename W::T* w, const float* scale, float* y, int64_t M,
                               int64_t N, int64_t K) {
  constexpr int64_t LINE = 64 / sizeof(typename W::T), L = Isa::L;
  at::parallel_for(0, N / NB, 4, [&](int64_t b0, int64_t b1) {
    std::vector<Isa::V> acc(static_cast<size_t>(M * NB));
    alignas(64) float buf[NB * KPC];
    const float* xr[kRowTile];
    for (int64_t b = b0; b < b1; ++b) {
      const typename W::T* wb = w + b * NB * K;
      std::fill(acc.begin(), acc.end(), Isa::zero());
      for (int64_t k0 = 0; k0 < K; k0 += KPC) {
        const int64_t kc = std::min(KPC, K - k0);
        for (int64_t kk = 0; kk < kc; kk += LINE)  // buf[j][kk + e] = row j's element k0 + kk + e
          for (int64_t j = 0; j < NB; ++j)
            for (int64_t e = 0; e < LINE; e += L)
              Isa::store(buf + j * KPC + kk + e, W::load(wb + (k0 + kk) * NB + j * LINE + e));
        for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
          const int R = static_cast<int>(std::min<int64_t>(kRowTile, M - m0));
          for (int r = 0; r < R; ++r) xr[r] = x + (m0 + r) * K + k0;
          for (int64_t j0 = 0; j0 < NB; j0 += NR)
            tile_rows_any<F32Weight>(R, xr, buf + j0 * KPC, KPC, 0, kc, NR, acc.data() + m0 * NB + j0, false);
        }
      }
      store_block(acc.data(), M, scale, y, N, b * NB);
    }
  });
}
#endif

// y (M, N) = x (M, K) @ unpack(w)^T * scale, w packed as above (N % NB == 0, K % LINE == 0)
template <class W>
void linear_kernel_packed(const float* x, const typename W::T* w, const float* scale, float* y, int64_t M, int64_t N,
                          int64_t K) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if (M > 2) return linear_kernel_packed_rows<W>(x, w, scale, y, M, N, K);
#endif
  at::parallel_for(0, N / NB, 4, [&](int64_t b0, int64_t b1) {
    float s0[NB], s1[NB];
    auto emit = [&](int64_t b, int64_t m, bool pair) {
      for (int64_t j = 0; j < NB; ++j) {
        const int64_t n = b * NB + j;
        const float sc = scale ? scale[n] : 1.f;
        y[m * N + n] = s0[j] * sc;
        if (pair) y[(m + 1) * N + n] = s1[j] * sc;
      }
    };
    int64_t first = b0;  // blocks before it are done
#if defined(__AVX512F__)
    const int64_t h = (b1 - b0) / kPackedStreams;  // kPackedStreams runs of h blocks, one block of each at a time
    alignas(64) Isa::V park[kPackedStreams][2 * NB];
    const typename W::T* wb[kPackedStreams];
    for (int64_t i = 0; i < h; ++i) {
      for (int s = 0; s < kPackedStreams; ++s) wb[s] = w + (b0 + s * h + i) * NB * K;
      for (int64_t m = 0; m < M; m += 2) {
        const bool pair = m + 1 < M;  // odd M: the last row is computed twice, stored once
        const float* x0 = x + m * K;
        dot_blocks_packed<W, kPackedStreams>(x0, pair ? x0 + K : x0, wb, K, park);
        for (int s = 0; s < kPackedStreams; ++s) {
          for (int64_t j = 0; j < NB; ++j) {
            s0[j] = Isa::reduce_add(park[s][j]);
            s1[j] = Isa::reduce_add(park[s][NB + j]);
          }
          emit(b0 + s * h + i, m, pair);
        }
      }
    }
    first = b0 + kPackedStreams * h;
#endif
    for (int64_t b = first; b < b1; ++b) {
      for (int64_t m = 0; m < M; m += 2) {
        const bool pair = m + 1 < M;
        const float* x0 = x + m * K;
        dot_block_packed<W>(x0, pair ? x0 + K : x0, w + b * NB * K, K, s0, s1);
        emit(b, m, pair);
      }
    }
  });
}

// ---- packed int8 weights x int16 activations: the int8 decode linear of AVX-512 builds -------------------------
// The kernel above widens every 16 int8 weights to fp32 (2 ops) and runs 2 FMAs with them: on this CPU's one
// 512-bit FMA port that is compute-bound at ~20 GB/s of weights (measured hot in L2), below what the memory gives.
// Here each row of x is rounded to int16 once per call (per-row scale s = max|x| / 32767: every value within s / 2,
// i.e. 2^-16 of the row's largest), the weights are widened to int16 (1 op per 32) and multiplied in integers,
// 32 products per op (vpdpwssd with AVX512-VNNI; vpmaddwd + vpaddd otherwise: the same exact sums), so compute is
// ~3x cheaper per weight. Integer sums are exact: the result does not depend on the order of the K products; each
// int32 lane sums K / 16 products of |w| <= 127 and |q| <= 32767, below 2^31 for K <= 8192 (larger K take the
// kernel above). Epilogue: y = float(sum of the 16 lanes) * s_x * scale_w.
//
// Memory: one weight stream per thread tops out at ~20-22 GB/s on the 2-core VM, 4+ streams reach ~28-31 GB/s
// (a plain AVX-512 read, measured). So a thread works on kStreams blocks at once, taken from kStreams quarters of its
// share of blocks: one 64-byte line of each of a block's NB rows, then the next block, the accumulators of the blocks
// not in hand parked in an L1 buffer (loads and stores run on ports the multiplies do not use). All T3 shapes at
// batch 2 (0.5 GB): 15.6-19 ms against 21.5-27.7 ms for the fp32-math kernel in interleaved runs of a standalone
// benchmark (~31 GB/s).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__GNUC__)
#define CBF_HAVE_I16_LINEAR 1
namespace i16 {
constexpr int kStreams = 4;
constexpr int64_t kPrefetch = 2048;  // bytes ahead within a block's stream
constexpr int64_t kMaxK = 8192;

// q = round(x / s) with s = max|x| / 32767 (1 for an all-zero row); returns s, NaN if x has a NaN or an infinity
float quantize_row(const float* x, int64_t K, int16_t* q) {
  __m512 mx = _mm512_setzero_ps(), nan = _mm512_setzero_ps();  // nan: 0 * x summed, NaN for any non-finite x
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    nan = _mm512_add_ps(nan, _mm512_mul_ps(v, _mm512_setzero_ps()));
  }
  float m = _mm512_reduce_max_ps(mx), bad = _mm512_reduce_add_ps(nan);
  for (int64_t t = k; t < K; ++t) {
    m = std::max(m, std::fabs(x[t]));
    bad += x[t] * 0.f;
  }
  if (bad != 0.f || std::isnan(bad)) return std::numeric_limits<float>::quiet_NaN();
  const float s = m > 0.f ? m / 32767.f : 1.f, inv = 1.f / s;
  const __m512 iv = _mm512_set1_ps(inv);
  const __m512i lo = _mm512_set1_epi32(-32767), hi = _mm512_set1_epi32(32767);
  for (k = 0; k + 16 <= K; k += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), iv));  // round to nearest even
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm512_cvtepi32_epi16(v));
  }
  for (; k < K; ++k) q[k] = static_cast<int16_t>(std::max(-32767.f, std::min(32767.f, std::nearbyint(x[k] * inv))));
  return s;
}

// lane j of the result = the sum of v[j]'s 16 lanes (j < 16), as floats: a transposing tree, 15 adds
inline __m512 reduce16(const __m512i* a) {
  __m512 v[16], u[8], w[4], x[2];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_cvtepi32_ps(a[i]);
  for (int i = 0; i < 8; ++i)  // 256-bit halves: lanes 0-7 partials of v[2i], 8-15 of v[2i+1]
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit quarters: quarter q partials of v[4i+q]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // pairs within quarters: [v[8i+q] x 2, v[8i+4+q] x 2] in quarter q
    x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));  // lane 4q+r: v[4r+q]
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), r);
}

// acc[s][j] (+)= w_j . x0, acc[s][NB + j] (+)= w_j . x1 (int32 lanes) for the NS packed blocks wb[s], over all K
#define CBF_I16_BLOCKS(DOT)                                                                                         \
  for (int s = 0; s < NS; ++s)                                                                                      \
    for (int j = 0; j < 2 * NB; ++j) acc[s][j] = _mm512_setzero_si512();                                            \
  for (int64_t k = 0; k < K; k += 64) {                                                                             \
    const __m512i x0a = _mm512_loadu_si512(x0 + k), x0b = _mm512_loadu_si512(x0 + k + 32);                          \
    const __m512i x1a = _mm512_loadu_si512(x1 + k), x1b = _mm512_loadu_si512(x1 + k + 32);                          \
    for (int s = 0; s < NS; ++s) {                                                                                  \
      const int8_t* c = wb[s] + k * NB; /* this chunk: NB lines of 64 weights */                                   \
      for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(c + j * 64) + kPrefetch, _MM_HINT_T0); \
      __m512i a0[NB], a1[NB];                                                                                       \
      for (int j = 0; j < NB; ++j) {                                                                                \
        a0[j] = acc[s][j];                                                                                          \
        a1[j] = acc[s][NB + j];                                                                                     \
      }                                                                                                             \
      for (int j = 0; j < NB; ++j) {                                                                                \
        const __m512i wa = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + j * 64))); \
        const __m512i wz =                                                                                          \
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + j * 64 + 32)));            \
        a0[j] = DOT(DOT(a0[j], wa, x0a), wz, x0b);                                                                  \
        a1[j] = DOT(DOT(a1[j], wa, x1a), wz, x1b);                                                                  \
      }                                                                                                             \
      for (int j = 0; j < NB; ++j) {                                                                                \
        acc[s][j] = a0[j];                                                                                          \
        acc[s][NB + j] = a1[j];                                                                                     \
      }                                                                                                             \
    }                                                                                                               \
  }

inline __m512i dot_bw(__m512i acc, __m512i w, __m512i x) { return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x)); }

template <int NS>
void blocks_bw(const int16_t* x0, const int16_t* x1, const int8_t* const* wb, int64_t K, __m512i (*acc)[2 * NB]) {
  CBF_I16_BLOCKS(dot_bw)
}

template <int NS>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void blocks_vnni(const int16_t* x0, const int16_t* x1,
                                                                          const int8_t* const* wb, int64_t K,
                                                                          __m512i (*acc)[2 * NB]) {
  CBF_I16_BLOCKS(_mm512_dpwssd_epi32)
}
#undef CBF_I16_BLOCKS

template <int NS>
inline void blocks(const int16_t* x0, const int16_t* x1, const int8_t* const* wb, int64_t K, __m512i (*acc)[2 * NB]) {
  if (dec::cpu_has_vnni()) {
    blocks_vnni<NS>(x0, x1, wb, K, acc);
  } else {
    blocks_bw<NS>(x0, x1, wb, K, acc);
  }
}

// y (M, N) = x (M, K) @ unpack(w)^T * scale with x rounded to int16 per row (above); w packed (N % NB == 0,
// K % 64 == 0, K <= kMaxK)
void linear_packed(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K) {
  thread_local std::vector<int16_t> qbuf;
  qbuf.resize(static_cast<size_t>(M * K));
  std::vector<float> sx(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) sx[m] = quantize_row(x + m * K, K, qbuf.data() + m * K);
  const int16_t* q = qbuf.data();
  at::parallel_for(0, N / NB, 4, [&](int64_t b0, int64_t b1) {
    alignas(64) __m512i acc[kStreams][2 * NB];
    const int8_t* wb[kStreams];
    for (int64_t m = 0; m < M; m += 2) {
      const bool pair = m + 1 < M;  // odd M: the last row is computed twice, stored once
      const int16_t* x0 = q + m * K;
      const int16_t* x1 = pair ? x0 + K : x0;
      const __m512 s0 = _mm512_set1_ps(sx[m]), s1 = _mm512_set1_ps(sx[pair ? m + 1 : m]);
      auto store = [&](int s, int64_t b) {  // block b's NB outputs of rows m (lanes 0-7) and m + 1 (8-15)
        const __m512 r = reduce16(acc[s]);
        const __m256 ws = _mm256_loadu_ps(scale + b * NB);
        const __m512 sc = _mm512_mul_ps(_mm512_insertf32x8(_mm512_castps256_ps512(ws), ws, 1),
                                        _mm512_mask_blend_ps(0xFF00, s0, s1));
        const __m512 out = _mm512_mul_ps(r, sc);
        _mm256_storeu_ps(y + m * N + b * NB, _mm512_castps512_ps256(out));
        if (pair) _mm256_storeu_ps(y + (m + 1) * N + b * NB, _mm512_extractf32x8_ps(out, 1));
      };
      const int64_t h = (b1 - b0) / kStreams;
      for (int64_t i = 0; i < h; ++i) {
        for (int s = 0; s < kStreams; ++s) wb[s] = w + (b0 + s * h + i) * NB * K;
        blocks<kStreams>(x0, x1, wb, K, acc);
        for (int s = 0; s < kStreams; ++s) store(s, b0 + s * h + i);
      }
      for (int64_t b = b0 + kStreams * h; b < b1; ++b) {
        wb[0] = w + b * NB * K;
        blocks<1>(x0, x1, wb, K, acc);
        store(0, b);
      }
    }
  });
}
}  // namespace i16
#endif

// The packed int8 linear of this build: int16 activations (above) where available, else the fp32-math kernel
void int8_linear_packed_kernel(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N,
                               int64_t K) {
#if defined(CBF_HAVE_I16_LINEAR)
  if (K % 64 == 0 && K <= i16::kMaxK) return i16::linear_packed(x, w, scale, y, M, N, K);
#endif
  linear_kernel_packed<Int8Weight>(x, w, scale, y, M, N, K);
}

// ---- decode attention: one query per (batch, head) over the first n cache slots -------------------------------
// y (B, H, 1, D) = softmax(q k[:n]^T * scale) v[:n] with n = input_pos[0] + 1: T3's decode step, whose mask keeps
// the slots <= the query's position (no kv_len argument: an int argument would make torch.compile specialise the
// step on every cache bucket). Reads each of the n key and value rows once (the step's KV bytes),
// so it runs at memory speed; ATen's flash kernel with the bool mask reads the whole kv_len bucket and takes ~2x
// the bandwidth floor for a single query. Softmax in base 2 (q pre-scaled by scale * log2 e), fp32 math. The cache
// may be fp32 or bf16 (the engine's low-precision CPU modes): bf16 rows are widened in registers, so the step reads
// half the cache bytes (1.5-1.7x faster at positions 150-800, measured) and the result equals fp32 attention over
// the bf16 values.
namespace dec {
#if defined(__AVX512F__) || defined(__AVX2__)
// D = NV * Isa::L (64: 4 AVX-512 or 8 AVX2 vectors): q in NV registers, one key row per score, the scores'
// exponentials vectorised over t, then P V into NV accumulators. Each pass reads one sequential stream (the K rows,
// then the V rows), which the hardware prefetchers alone bring in at ~10 GB/s per thread on the 2-core VM; so the
// Q K pass also prefetches the V rows (into L2) and the P V pass the next group's K rows (`next_k`, may be null):
// two streams per thread. The int8 draft's step at cache positions 300 / 600 (bf16 cache): 22.9 -> 21.5 ms and
// 25.7 -> 22.3 ms (median of 25, interleaved with the old build; the arithmetic is unchanged, bit for bit).
template <class C, int NV>
void attend_vec(const float* q, const typename C::T* k, const typename C::T* v, const float* ks, const float* vs,
                int64_t n, float* sc, float* out, const typename C::T* next_k) {
  constexpr bool kScaled = std::is_same<C, Int8Weight>::value;  // int8 rows: k_t = ks[t] k8_t, v_t = vs[t] v8_t
  using V = Isa::V;
  constexpr int64_t L = Isa::L, D = NV * Isa::L;
  V qv[NV];
  for (int i = 0; i < NV; ++i) qv[i] = Isa::load(q + i * L);
  float mx = -std::numeric_limits<float>::infinity();
  constexpr int64_t RB = D * sizeof(typename C::T);  // bytes per cache row
  for (int64_t t = 0; t < n; ++t) {
    const typename C::T* kt = k + t * D;
    for (int64_t c = 0; c < RB; c += 64) _mm_prefetch(reinterpret_cast<const char*>(v + t * D) + c, _MM_HINT_T1);
    V a = Isa::mul(qv[0], C::load(kt));
    for (int i = 1; i < NV; ++i) a = Isa::fma(qv[i], C::load(kt + i * L), a);
    sc[t] = kScaled ? Isa::reduce_add(a) * ks[t] : Isa::reduce_add(a);
    mx = std::max(mx, sc[t]);
  }
  const V mv = Isa::set1(mx);
  V sum = Isa::zero();
  int64_t t = 0;
  for (; t + L <= n; t += L) {
    const V e = Isa::exp2(Isa::sub(Isa::load(sc + t), mv));
    Isa::store(sc + t, e);
    sum = Isa::add(sum, e);
  }
  if (t < n) {
    const V e = Isa::keep_first(Isa::exp2(Isa::sub(Isa::load_tail(sc + t, n - t), mv)), n - t);
    Isa::store_tail(sc + t, e, n - t);
    sum = Isa::add(sum, e);
  }
  V o[NV];
  for (int i = 0; i < NV; ++i) o[i] = Isa::zero();
  for (t = 0; t < n; ++t) {
    const typename C::T* vt = v + t * D;
    if (next_k != nullptr)
      for (int64_t c = 0; c < RB; c += 64) _mm_prefetch(reinterpret_cast<const char*>(next_k + t * D) + c, _MM_HINT_T1);
    const V p = Isa::set1(kScaled ? sc[t] * vs[t] : sc[t]);
    for (int i = 0; i < NV; ++i) o[i] = Isa::fma(p, C::load(vt + i * L), o[i]);
  }
  const V inv = Isa::set1(1.f / Isa::reduce_add(sum));
  for (int i = 0; i < NV; ++i) Isa::store(out + i * L, Isa::mul(o[i], inv));
}
#endif

// one (batch, head): q (D,) pre-scaled, k / v (n, D) rows contiguous (fp32; bf16 or int8 widened in registers: C is
// F32Weight, Bf16Weight or Int8Weight, the int8 rows with one scale each in ks / vs, unused otherwise), scores
// scratch (>= n + 16), out (D,); next_k: the K rows the caller reads next (prefetched), or null. Vector path for
// D = 4 or 8 vectors (64 on both ISAs, 128 on AVX-512), else a loop.
template <class C>
void attend_one(const float* q, const typename C::T* k, const typename C::T* v, const float* ks, const float* vs,
                int64_t n, int64_t D, float* sc, float* out, const typename C::T* next_k = nullptr) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if (D == 4 * Isa::L) return attend_vec<C, 4>(q, k, v, ks, vs, n, sc, out, next_k);
  if (D == 8 * Isa::L) return attend_vec<C, 8>(q, k, v, ks, vs, n, sc, out, next_k);
#else
  (void)next_k;
#endif
  constexpr bool kScaled = std::is_same<C, Int8Weight>::value;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    float a = 0.f;
    for (int64_t d = 0; d < D; ++d) a += q[d] * C::load1(k + t * D + d);
    sc[t] = kScaled ? a * ks[t] : a;
    mx = std::max(mx, sc[t]);
  }
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += (sc[t] = std::exp2(sc[t] - mx));
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    const float p = kScaled ? sc[t] * vs[t] : sc[t];
    for (int64_t d = 0; d < D; ++d) out[d] += p * C::load1(v + t * D + d);
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= sum;
}

// every (batch, head) g < B * H over the ATen pool: q rows at q + b * q_sb + h * q_sh, out rows likewise (y_sb,
// y_sh), caches (B, H, S, D) contiguous of dtype cdt (fp32, bf16 or int8: then ksc / vsc are their (B, H, S) row
// scales), the first n slots; q scaled by qscale first. nq > 1 queries per (batch, head) (the speculative decoder's
// k-token verification): query t at + t * q_st (out + t * y_st) over the first n + t slots, all nq of a group in
// a row, so its cache rows are read from memory once and from L2 for the other nq - 1 (each query's arithmetic is the
// one-query call's)
void attend_heads(const float* q, int64_t q_sb, int64_t q_sh, const void* kc, const void* vc, at::ScalarType cdt,
                  int64_t B, int64_t H, int64_t S, int64_t D, int64_t n, float qscale, float* y, int64_t y_sb,
                  int64_t y_sh, const float* ksc = nullptr, const float* vsc = nullptr, int64_t nq = 1,
                  int64_t q_st = 0, int64_t y_st = 0) {
  auto run = [&](auto row) {
    using C = decltype(row);
    using T = typename C::T;
    const T* kp = static_cast<const T*>(kc);
    const T* vp = static_cast<const T*>(vc);
    at::parallel_for(0, B * H, 1, [&](int64_t g0, int64_t g1) {
      std::vector<float> sc(static_cast<size_t>(n + nq + 16)), qv(static_cast<size_t>(D));
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t b = g / H, h = g % H;
        for (int64_t t = 0; t < nq; ++t) {
          const float* qg = q + b * q_sb + h * q_sh + t * q_st;
          for (int64_t d = 0; d < D; ++d) qv[d] = qg[d] * qscale;
          float* yg = y + b * y_sb + h * y_sh + t * y_st;
          attend_one<C>(qv.data(), kp + g * S * D, vp + g * S * D, ksc == nullptr ? nullptr : ksc + g * S,
                        vsc == nullptr ? nullptr : vsc + g * S, n + t, D, sc.data(), yg,
                        t + 1 == nq && g + 1 < g1 ? kp + (g + 1) * S * D : nullptr);  // the next group's K rows
        }
      }
    });
  };
  if (cdt == at::kBFloat16) {
    run(Bf16Weight{});  // half the cache bytes: the step's KV reads are memory-bound
  } else if (cdt == at::kChar) {
    run(Int8Weight{});  // a quarter (+ 4 bytes of scale per row)
  } else {
    run(F32Weight{});
  }
}
}  // namespace dec

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& input_pos, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 4 && q.size(2) == 1,
              "decode_attention: q must be a (B, H, 1, D) float32 CPU tensor, got ", q.sizes(), " ", q.scalar_type());
  const at::ScalarType cdt = k_cache.scalar_type();
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->device().is_cpu() && (cdt == at::kFloat || cdt == at::kBFloat16) && c->scalar_type() == cdt &&
                    c->dim() == 4 && c->is_contiguous() && c->size(0) == q.size(0) && c->size(1) == q.size(1) &&
                    c->size(3) == q.size(3),
                "decode_attention: the caches must be contiguous (B, H, max_seq, D) CPU tensors, both float32 or both "
                "bfloat16, matching q ", q.sizes(), ", got ", c->sizes(), " ", c->scalar_type());
  }
  TORCH_CHECK(input_pos.device().is_cpu() && input_pos.scalar_type() == at::kLong && input_pos.numel() == 1,
              "decode_attention: input_pos must be a (1,) int64 CPU tensor");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), S = k_cache.size(2);
  const int64_t n = input_pos.data_ptr<int64_t>()[0] + 1;
  TORCH_CHECK(n >= 1 && n <= S, "decode_attention: position ", n - 1, " outside the ", S, "-slot cache");
  TORCH_CHECK(q.stride(3) == 1, "decode_attention: q's last dim must be contiguous");
  const float qscale = static_cast<float>(scale * 1.4426950408889634);  // base-2 softmax
  at::Tensor y = at::empty({B, H, 1, D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  dec::attend_heads(qp, q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), cdt, B, H, S, D, n, qscale,
                    yp, H * D, D);
  return y;
}

// ---- T3's whole layer stack for one decode step, in one call -----------------------------------------------------
// x (B, D) -> x after every Llama layer (before the final norm), at position p = input_pos[0]; writes each layer's
// k / v into its cache slot p. The same math as the module path (RMSNorm, fused q/k/v, rotate-half RoPE, the
// attention above over slots <= p, o_proj + residual, RMSNorm, fused gate/up, SiLU * up, down + residual) with the
// same linear kernels, but no per-op dispatch: the module path's ~15 ops per layer cost ~2-4 us each through the
// dispatcher / inductor's Python wrapper (8-10 ms per token at 30 layers, a third of the int8 step), here the
// small ops are loops over a few thousand floats and only the linears and the attention use the thread pool.
namespace stack {

struct Lin {  // one linear's weight (N, K): int8 with per-channel scales (row-major or packed), bf16 or fp32
  const void* w;
  const float* s;
  at::ScalarType t;
  int64_t N, K;
  bool packed;
};

Lin make_lin(const at::Tensor& w, const at::Tensor& s, int64_t N, int64_t K, const char* what, int64_t layer) {
  const at::ScalarType t = w.scalar_type();
  const bool packed = w.dim() == 4;  // packed (N / NB, K / c, NB, c), c = 64 int8 or 32 bf16 (one 64-byte line)
  if (packed) {
    const int64_t c = t == at::kBFloat16 ? 32 : 64;
    TORCH_CHECK(w.device().is_cpu() && (t == at::kChar || t == at::kBFloat16) && w.is_contiguous() &&
                    w.size(0) * NB == N && w.size(1) * c == K && w.size(2) == NB && w.size(3) == c,
                "decode_layers: layer ", layer, " ", what, " packed weight must be a contiguous (", N / NB, ", ", K / c,
                ", ", NB, ", ", c, ") int8 (c = 64) or bfloat16 (c = 32) CPU tensor, got ", w.sizes(), " ", t);
  }
  TORCH_CHECK(packed || (w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                  (t == at::kChar || t == at::kBFloat16 || t == at::kFloat) && w.size(0) == N && w.size(1) == K),
              "decode_layers: layer ", layer, " ", what, " weight must be a contiguous (", N, ", ", K,
              ") int8 / bfloat16 / float32 CPU tensor, got ", w.sizes(), " ", t);
  const float* sp = nullptr;
  if (t == at::kChar) {
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == N,
                "decode_layers: layer ", layer, " ", what, ": an int8 weight needs (", N, ",) float32 scales, got ",
                s.sizes(), " ", s.scalar_type());
    sp = s.data_ptr<float>();
  } else {
    TORCH_CHECK(s.numel() == 0, "decode_layers: layer ", layer, " ", what, ": scales are for int8 weights only");
  }
  return {w.data_ptr(), sp, t, N, K, packed};
}

void linear(const Lin& l, const float* x, float* y, int64_t M) {
  if (l.packed && l.t == at::kChar) {
    int8_linear_packed_kernel(x, static_cast<const int8_t*>(l.w), l.s, y, M, l.N, l.K);
  } else if (l.packed) {
    linear_kernel_packed<Bf16Weight>(x, static_cast<const uint16_t*>(l.w), nullptr, y, M, l.N, l.K);
  } else if (l.t == at::kChar) {
    linear_kernel<Int8Weight>(x, static_cast<const int8_t*>(l.w), l.s, y, M, l.N, l.K);
  } else if (l.t == at::kBFloat16) {
    linear_kernel<Bf16Weight>(x, static_cast<const uint16_t*>(l.w), nullptr, y, M, l.N, l.K);
  } else {
    linear_kernel<F32Weight>(x, static_cast<const float*>(l.w), nullptr, y, M, l.N, l.K);
  }
}

// y[m] = w * (x[m] * rsqrt(mean(x[m]^2) + eps)), fp32 (T3's RMSNorm)
void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t D, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * D;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // 8 partial sums (vectorisable, a fixed order)
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int64_t j = 0; j < 8; ++j) acc[j] += xm[d + j] * xm[d + j];
    float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; d < D; ++d) ss += xm[d] * xm[d];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (d = 0; d < D; ++d) y[m * D + d] = w[d] * (xm[d] * r);
  }
}

// x (hd,) in place: rotate-half RoPE with cos / sin rows (hd,) (HF Llama: x * cos + rotate_half(x) * sin)
inline void rope(float* x, const float* cs, int64_t hd) {  // cs: (hd, 2) interleaved cos, sin
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = x[d], b = x[d + half];
    x[d] = a * cs[2 * d] - b * cs[2 * d + 1];
    x[d + half] = b * cs[2 * (d + half)] + a * cs[2 * (d + half) + 1];
  }
}

// y = silu(g) * u over n values; silu(g) = g * sigmoid(g) with exp of -|g| only (never overflows)
void silu_mul(const float* g, const float* u, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  using V = Isa::V;
  const V one = Isa::set1(1.f), nl2e = Isa::set1(-1.4426950408889634f);
  for (; i + Isa::L <= n; i += Isa::L) {
    const V gv = Isa::load(g + i);
    const V e = Isa::exp2(Isa::mul(Isa::abs(gv), nl2e));  // exp(-|g|) in (0, 1]
    const V inv = Isa::div(one, Isa::add(one, e));         // sigmoid(|g|)
    const V sig = Isa::select_nonneg(gv, inv, Isa::mul(e, inv));  // g >= 0 ? 1 / (1 + e) : e / (1 + e)
    Isa::store(y + i, Isa::mul(Isa::mul(gv, sig), Isa::load(u + i)));
  }
#endif
  for (; i < n; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

}  // namespace stack

namespace w8a8 {
void quantize_row(const float* x, int64_t K, int8_t* q, float* s);
}

// x (B, D) float32, or (T, B, D): T consecutive tokens at positions p .. p + T - 1 (the speculative decoder's
// verification; token t's queries attend to the slots <= p + t, its own and its predecessors' k / v included);
// per layer l: weights[4l..4l+3] = qkv (3 H hd, D), o (D, H hd), gate_up (2 I, D), down (D, I),
// scales[4l..] their int8 scales (empty for bf16 / fp32 weights), norms[2l], norms[2l+1] = input / post-attention
// RMSNorm weights (D,); k_caches[l], v_caches[l] (B, H, S, hd) float32, bfloat16 or int8, with (int8 only, else an
// empty list) kv_scales[2l], kv_scales[2l+1] the k / v rows' float32 scales (B, H, S): each new row is quantised
// symmetrically (round(x * 127 / max|x|), scale max|x| / 127); rope (>= p + 1, hd, 2) float32.
namespace stack {
// cache row `srow` (= (b H + h) S + position) of a k / v cache pair := kr / vr (hd floats each), in the cache's
// dtype: fp32 copied, bf16 rounded to nearest even (as Tensor.to), int8 quantised per row with its scale into
// ksc / vsc (as KVCache.update)
inline void write_kv(at::ScalarType cdt, void* kc, void* vc, float* ksc, float* vsc, int64_t srow, const float* kr,
                     const float* vr, int64_t hd) {
  const int64_t slot = srow * hd;
  if (cdt == at::kBFloat16) {
    for (int64_t d = 0; d < hd; ++d) {
      static_cast<c10::BFloat16*>(kc)[slot + d] = c10::BFloat16(kr[d]);
      static_cast<c10::BFloat16*>(vc)[slot + d] = c10::BFloat16(vr[d]);
    }
  } else if (cdt == at::kChar) {
    w8a8::quantize_row(kr, hd, static_cast<int8_t*>(kc) + slot, ksc + srow);
    w8a8::quantize_row(vr, hd, static_cast<int8_t*>(vc) + slot, vsc + srow);
  } else {
    std::memcpy(static_cast<float*>(kc) + slot, kr, hd * sizeof(float));
    std::memcpy(static_cast<float*>(vc) + slot, vr, hd * sizeof(float));
  }
}
}  // namespace stack

// Cache slots [start, stop) of every layer: dst := src, src fp32 (B, H, S, hd) caches, dst of one dtype (fp32, bf16
// or int8 with its (B, H, S') row scales, 2 per layer) and as many slots or more: the speculative decoder's draft
// catching up on the target's slots (generation/speculative.copy_cache_slots) in one call instead of ~10 ops a layer
void copy_kv_slots(at::TensorList src_k, at::TensorList src_v, at::TensorList dst_k, at::TensorList dst_v,
                   at::TensorList dst_scales, int64_t start, int64_t stop) {
  const int64_t nl = static_cast<int64_t>(src_k.size());
  TORCH_CHECK(nl >= 1 && static_cast<int64_t>(src_v.size()) == nl && static_cast<int64_t>(dst_k.size()) == nl &&
                  static_cast<int64_t>(dst_v.size()) == nl,
              "copy_kv_slots: expected as many source and destination k / v caches, got ", src_k.size(), ", ",
              src_v.size(), ", ", dst_k.size(), ", ", dst_v.size());
  const at::Tensor& s0 = src_k[0];
  const at::Tensor& d0 = dst_k[0];
  TORCH_CHECK(s0.dim() == 4 && d0.dim() == 4, "copy_kv_slots: caches must be (B, H, S, hd)");
  const int64_t B = s0.size(0), H = s0.size(1), S = s0.size(2), hd = s0.size(3), Sd = d0.size(2);
  const at::ScalarType cdt = d0.scalar_type();
  TORCH_CHECK(cdt == at::kFloat || cdt == at::kBFloat16 || cdt == at::kChar, "copy_kv_slots: destination caches "
              "must be float32, bfloat16 or int8, got ", cdt);
  TORCH_CHECK(0 <= start && start <= stop && stop <= S && stop <= Sd, "copy_kv_slots: slots ", start, "..", stop,
              " outside the caches (", S, " and ", Sd, " slots)");
  TORCH_CHECK(static_cast<int64_t>(dst_scales.size()) == (cdt == at::kChar ? 2 * nl : 0), "copy_kv_slots: int8 "
              "destinations need 2 scale tensors per layer (others none), got ", dst_scales.size());
  for (int64_t l = 0; l < nl; ++l) {
    for (const at::Tensor* t : {&src_k[l], &src_v[l]})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                      t->sizes() == s0.sizes(), "copy_kv_slots: layer ", l, " source caches must be contiguous ",
                  s0.sizes(), " float32 CPU tensors, got ", t->sizes(), " ", t->scalar_type());
    for (const at::Tensor* t : {&dst_k[l], &dst_v[l]})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == cdt && t->is_contiguous() && t->sizes() == d0.sizes() &&
                      t->size(0) == B && t->size(1) == H && t->size(3) == hd,
                  "copy_kv_slots: layer ", l, " destination caches must be contiguous (", B, ", ", H, ", S, ", hd,
                  ") CPU tensors like layer 0's, got ", t->sizes(), " ", t->scalar_type());
    for (int64_t j = 0; cdt == at::kChar && j < 2; ++j) {
      const at::Tensor& sc = dst_scales[2 * l + j];
      TORCH_CHECK(sc.device().is_cpu() && sc.scalar_type() == at::kFloat && sc.is_contiguous() && sc.dim() == 3 &&
                      sc.size(0) == B && sc.size(1) == H && sc.size(2) == Sd,
                  "copy_kv_slots: layer ", l, " scales must be contiguous (", B, ", ", H, ", ", Sd, ") float32");
    }
  }
  for (int64_t l = 0; l < nl; ++l) {
    const float* sk = src_k[l].data_ptr<float>();
    const float* sv = src_v[l].data_ptr<float>();
    void* kc = dst_k[l].data_ptr();
    void* vc = dst_v[l].data_ptr();
    float* ksc = cdt == at::kChar ? dst_scales[2 * l].data_ptr<float>() : nullptr;
    float* vsc = cdt == at::kChar ? dst_scales[2 * l + 1].data_ptr<float>() : nullptr;
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t pt = start; pt < stop; ++pt)
        stack::write_kv(cdt, kc, vc, ksc, vsc, bh * Sd + pt, sk + (bh * S + pt) * hd, sv + (bh * S + pt) * hd, hd);
  }
}

at::Tensor decode_layers(const at::Tensor& x, at::TensorList weights, at::TensorList scales, at::TensorList norms,
                         at::TensorList k_caches, at::TensorList v_caches, at::TensorList kv_scales,
                         const at::Tensor& rope, const at::Tensor& input_pos, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && (x.dim() == 2 || x.dim() == 3) &&
                  x.is_contiguous() && x.numel() > 0,
              "decode_layers: x must be a contiguous (B, D) or (T, B, D) float32 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t nl = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(nl >= 1 && static_cast<int64_t>(v_caches.size()) == nl &&
                  static_cast<int64_t>(weights.size()) == 4 * nl &&
                  static_cast<int64_t>(scales.size()) == 4 * nl && static_cast<int64_t>(norms.size()) == 2 * nl,
              "decode_layers: expected 4 weights, 4 scales, 2 norms and 2 caches per layer, got ", weights.size(), ", ",
              scales.size(), ", ", norms.size(), ", ", k_caches.size(), " + ", v_caches.size());
  const int64_t T = x.dim() == 3 ? x.size(0) : 1, B = x.size(-2), D = x.size(-1), M = T * B;  // rows (t, b)
  const at::Tensor& c0 = k_caches[0];
  TORCH_CHECK(c0.dim() == 4, "decode_layers: caches must be (B, H, S, hd), got ", c0.sizes());
  const int64_t H = c0.size(1), S = c0.size(2), hd = c0.size(3), inner = H * hd;
  const at::ScalarType cdt = c0.scalar_type();
  const at::Tensor& gu_w = weights[2];  // (2 I, D), or packed (2 I / NB, D / 64, NB, 64)
  const int64_t I = (gu_w.dim() == 4 ? gu_w.size(0) * NB : gu_w.size(0)) / 2;
  TORCH_CHECK(input_pos.device().is_cpu() && input_pos.scalar_type() == at::kLong && input_pos.numel() == 1,
              "decode_layers: input_pos must be a (1,) int64 CPU tensor");
  const int64_t p = input_pos.data_ptr<int64_t>()[0];
  TORCH_CHECK(p >= 0 && p + T <= S, "decode_layers: positions ", p, "..", p + T - 1, " outside the ", S,
              "-slot cache");
  TORCH_CHECK(rope.device().is_cpu() && rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.dim() == 3 &&
                  rope.size(0) >= p + T && rope.size(1) == hd && rope.size(2) == 2 && hd % 2 == 0,
              "decode_layers: rope must be a contiguous (>= ", p + T, ", ", hd, ", 2) float32 table, got ",
              rope.sizes());
  std::vector<stack::Lin> lins;
  lins.reserve(4 * nl);
  for (int64_t l = 0; l < nl; ++l) {
    lins.push_back(stack::make_lin(weights[4 * l], scales[4 * l], 3 * inner, D, "qkv", l));
    lins.push_back(stack::make_lin(weights[4 * l + 1], scales[4 * l + 1], D, inner, "o_proj", l));
    lins.push_back(stack::make_lin(weights[4 * l + 2], scales[4 * l + 2], 2 * I, D, "gate_up", l));
    lins.push_back(stack::make_lin(weights[4 * l + 3], scales[4 * l + 3], D, I, "down_proj", l));
    for (int64_t j = 0; j < 2; ++j) {
      const at::Tensor& nw = norms[2 * l + j];
      TORCH_CHECK(nw.device().is_cpu() && nw.scalar_type() == at::kFloat && nw.is_contiguous() && nw.numel() == D,
                  "decode_layers: layer ", l, " norm weights must be contiguous (", D, ",) float32, got ", nw.sizes());
    }
    for (const at::Tensor* c : {&k_caches[l], &v_caches[l]}) {
      TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == cdt &&
                      (cdt == at::kFloat || cdt == at::kBFloat16 || cdt == at::kChar) && c->is_contiguous() &&
                      c->sizes() == c0.sizes() && c->size(0) == B,
                  "decode_layers: layer ", l, " caches must be contiguous (", B, ", H, S, hd) CPU tensors like layer "
                  "0's ", c0.sizes(), " ", cdt, " (float32, bfloat16 or int8), got ", c->sizes(), " ",
                  c->scalar_type());
    }
    if (cdt == at::kChar) {
      TORCH_CHECK(static_cast<int64_t>(kv_scales.size()) == 2 * nl, "decode_layers: int8 caches need 2 scale tensors "
                  "per layer, got ", kv_scales.size(), " for ", nl, " layers");
      for (int64_t j = 0; j < 2; ++j) {
        const at::Tensor& sc = kv_scales[2 * l + j];
        TORCH_CHECK(sc.device().is_cpu() && sc.scalar_type() == at::kFloat && sc.is_contiguous() && sc.dim() == 3 &&
                        sc.size(0) == B && sc.size(1) == H && sc.size(2) == S,
                    "decode_layers: layer ", l, " cache scales must be contiguous (", B, ", ", H, ", ", S,
                    ") float32 CPU tensors, got ", sc.sizes(), " ", sc.scalar_type());
      }
    }
  }
  TORCH_CHECK(cdt == at::kChar || kv_scales.empty(), "decode_layers: kv_scales are for int8 caches only");
  at::Tensor out = x.clone();
  float* xs = out.data_ptr<float>();
  std::vector<float> h(M * D), tmp(M * D), qkv(M * 3 * inner), att(M * inner), gu(M * 2 * I), act(M * I);
  const float qscale = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(hd)));
  const float feps = static_cast<float>(eps);
  for (int64_t l = 0; l < nl; ++l) {
    stack::rms_norm(xs, norms[2 * l].data_ptr<float>(), h.data(), M, D, feps);
    stack::linear(lins[4 * l], h.data(), qkv.data(), M);
    void* kc = k_caches[l].data_ptr();
    void* vc = v_caches[l].data_ptr();
    float* ksc = cdt == at::kChar ? kv_scales[2 * l].data_ptr<float>() : nullptr;
    float* vsc = cdt == at::kChar ? kv_scales[2 * l + 1].data_ptr<float>() : nullptr;
    for (int64_t m = 0; m < M; ++m) {  // RoPE on q and k, then k and v into cache slot p + t
      const int64_t t = m / B, b = m % B, pt = p + t;
      const float* cs = rope.data_ptr<float>() + pt * hd * 2;
      float* row = qkv.data() + m * 3 * inner;
      for (int64_t hh = 0; hh < 2 * H; ++hh) stack::rope(row + hh * hd, cs, hd);
      for (int64_t hh = 0; hh < H; ++hh)
        stack::write_kv(cdt, kc, vc, ksc, vsc, (b * H + hh) * S + pt, row + inner + hh * hd, row + 2 * inner + hh * hd,
                        hd);
    }
    // token t: slots <= p + t (causal within the T tokens)
    dec::attend_heads(qkv.data(), 3 * inner, hd, kc, vc, cdt, B, H, S, hd, p + 1, qscale, att.data(), inner, hd, ksc,
                      vsc, T, B * 3 * inner, B * inner);
    stack::linear(lins[4 * l + 1], att.data(), tmp.data(), M);
    for (int64_t i = 0; i < M * D; ++i) xs[i] += tmp[i];
    stack::rms_norm(xs, norms[2 * l + 1].data_ptr<float>(), h.data(), M, D, feps);
    stack::linear(lins[4 * l + 2], h.data(), gu.data(), M);
    for (int64_t m = 0; m < M; ++m)
      stack::silu_mul(gu.data() + m * 2 * I, gu.data() + m * 2 * I + I, act.data() + m * I, I);
    stack::linear(lins[4 * l + 3], act.data(), tmp.data(), M);
    for (int64_t i = 0; i < M * D; ++i) xs[i] += tmp[i];
  }
  return out;
}

// ---- full (unmasked) self-attention for S3Gen's CFM estimator: T queries x T keys per (batch, head) -------------
//
// The estimator runs 56 attentions over the whole mel (T ~ 750-1100 frames, 8 heads of 64, CFG batch 2) per call,
// ~45 % of its FLOPs. ATen's CPU flash kernel does them at ~40-60 % of this machine's GEMM rate; this kernel keeps
// everything of one (batch, head) in L2 and runs both products as register-tiled micro-kernels:
//   - pack K^T into panels of KW keys (D x KW: the QK micro-kernel's B operand stays in L1) and V into (T, D) rows;
//   - per block of MB = 48 queries (q pre-scaled by scale * log2 e): S = Q K^T in QR x KW tiles, the row maxima
//     tracked in the same pass; exact row softmax in base 2 over the whole row (no online rescaling: the block's
//     48 x T scores fit in L2), 1 / row sum kept; O = P V in PR-row tiles over V blocks of 32 rows (L1), then
//     O / sum written straight into the (B, T, H, D) output.
// AVX-512: 12 x 32 QK tiles, 6 x 64 PV tiles. AVX2 (16 registers): 6 x 16 QK tiles, 3 x 32 PV tiles (two halves of D).
// Inputs are (B, T, H, D) views with a contiguous last dim (the q/k/v linears' outputs, no transpose copies).
// fp32 throughout; differs from SDPA by float rounding (~1e-6 relative). Other builds / head sizes: a plain loop.
namespace full {
constexpr int D = 64;    // head size of the fast paths
constexpr int MB = 48;   // queries per block (a multiple of every QR and PR)
constexpr int TB = 32;   // V rows per PV block

struct Buf {  // per-thread scratch, grown on demand and kept (the ATen/OpenMP pool threads persist)
  float* p = nullptr;
  size_t n = 0;
  float* get(size_t m) {
    if (m > n) {
      std::free(p);
      p = static_cast<float*>(std::aligned_alloc(64, (m * sizeof(float) + 63) / 64 * 64));
      TORCH_CHECK(p != nullptr, "full_attention: out of memory");
      n = m;
    }
    return p;
  }
  ~Buf() { std::free(p); }
};

struct Head {  // one (batch, head): row pointers and row strides in floats
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t ldq, ldk, ldv, ldo;
};

inline void prefetch_row(const float* p) {
#if defined(__AVX512F__) || defined(__AVX2__)
  for (int c = 0; c < D; c += 16) _mm_prefetch(reinterpret_cast<const char*>(p + c), _MM_HINT_T0);
#endif
}

#if defined(__AVX512F__) || defined(__AVX2__)
using V = Isa::V;
constexpr int L = Isa::L, KW = Isa::KW, QR = Isa::QR, PR = Isa::PR, KV = KW / L;
static_assert(MB % QR == 0 && MB % PR == 0 && D % Isa::PW == 0 && Isa::PW % L == 0, "tile sizes");

// S[r][0..KW) = qp[r] . kt panel (D x KW), r < QR; rmax[r] = max(rmax[r], S[r][..])
inline void qk_tile(const float* qp, const float* kt, float* s, int64_t lds, V* rmax) {
  V acc[QR][KV];
  for (int r = 0; r < QR; ++r)
    for (int j = 0; j < KV; ++j) acc[r][j] = Isa::zero();
  for (int d = 0; d < D; ++d) {
    V b[KV];
    for (int j = 0; j < KV; ++j) b[j] = Isa::load(kt + d * KW + j * L);
    for (int r = 0; r < QR; ++r) {
      const V a = Isa::set1(qp[r * D + d]);
      for (int j = 0; j < KV; ++j) acc[r][j] = Isa::fma(a, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < QR; ++r) {
    V m = rmax[r];
    for (int j = 0; j < KV; ++j) {
      Isa::store(s + r * lds + j * L, acc[r][j]);
      m = Isa::max(m, acc[r][j]);
    }
    rmax[r] = m;
  }
}

// o[r][c0..c0+W) (+)= sum_{t < n} p[r][t] v[t][c0..c0+W), r < PR, for each column group of W = D / groups
inline void pv_tile(const float* p, int64_t ldp, const float* v, int n, float* o, bool first) {
  constexpr int W = Isa::PW, WV = W / L;  // PR x WV accumulators: AVX-512 6 x 4, AVX2 3 x 4
  for (int c0 = 0; c0 < D; c0 += W) {
    V c[PR][WV];
    for (int r = 0; r < PR; ++r)
      for (int j = 0; j < WV; ++j) c[r][j] = first ? Isa::zero() : Isa::load(o + r * D + c0 + j * L);
    for (int t = 0; t < n; ++t) {
      V vt[WV];
      for (int j = 0; j < WV; ++j) vt[j] = Isa::load(v + t * D + c0 + j * L);
      for (int r = 0; r < PR; ++r) {
        const V a = Isa::set1(p[r * ldp + t]);
        for (int j = 0; j < WV; ++j) c[r][j] = Isa::fma(a, vt[j], c[r][j]);
      }
    }
    for (int r = 0; r < PR; ++r)
      for (int j = 0; j < WV; ++j) Isa::store(o + r * D + c0 + j * L, c[r][j]);
  }
}

// K^T panels (panel j: keys [KW j, KW j + KW) as D x KW, zero beyond T) and V rows (T x D), both contiguous.
void pack_kv(const Head& h, int64_t T, int64_t Tp, float* kt, float* vv) {
  for (int64_t t = 0; t < Tp; t += L) {
    for (int64_t u = t + 2 * KW; u < std::min<int64_t>(t + 2 * KW + L, T); ++u) {  // strided rows: prefetch ahead
      prefetch_row(h.k + u * h.ldk);
      prefetch_row(h.v + u * h.ldv);
    }
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(L, T - t));
    float* kp = kt + (t / KW) * (D * KW) + (t % KW);
    const float* kr = h.k + t * h.ldk;
    for (int d0 = 0; d0 < D; d0 += L) {  // L keys x L channels, transposed in registers
      V r[L];
      for (int i = 0; i < L; ++i) r[i] = i < n ? Isa::load(kr + i * h.ldk + d0) : Isa::zero();
      Isa::transpose(r);
      for (int c = 0; c < L; ++c) Isa::store(kp + (d0 + c) * KW, r[c]);
    }
    for (int64_t u = t; u < t + n; ++u) std::memcpy(vv + u * D, h.v + u * h.ldv, D * sizeof(float));
  }
}

// exp2(s - max) over a row in place; returns the row sum
inline float softmax_row(float* sr, int64_t T, float mx) {
  const V mv = Isa::set1(mx);
  V sum = Isa::zero(), sum2 = Isa::zero();
  int64_t t = 0;
  for (; t + 2 * L <= T; t += 2 * L) {
    const V e = Isa::exp2(Isa::sub(Isa::load(sr + t), mv)), e2 = Isa::exp2(Isa::sub(Isa::load(sr + t + L), mv));
    Isa::store(sr + t, e);
    Isa::store(sr + t + L, e2);
    sum = Isa::add(sum, e);
    sum2 = Isa::add(sum2, e2);
  }
  for (; t < T; t += L) {
    const int64_t n = T - t;  // the masked-off lanes load 0 -> exp2(-max) != 0: keep them out of the sum
    const V e = Isa::exp2(Isa::sub(Isa::load_tail(sr + t, n), mv));
    Isa::store_tail(sr + t, e, n);
    alignas(64) float tmp[L];
    Isa::store(tmp, e);
    for (int i = static_cast<int>(std::min<int64_t>(n, L)); i < L; ++i) tmp[i] = 0.f;
    sum = Isa::add(sum, Isa::load(tmp));
  }
  return Isa::reduce_add(Isa::add(sum, sum2));
}

void attend_head(const Head& h, int64_t T, float qscale) {
  thread_local Buf bkt, bv, bs, bq, bo;
  const int64_t Tp = (T + KW - 1) / KW * KW;
  const int64_t lds = Tp + 16;  // score row stride: never a multiple of 4 KB (L1 set aliasing)
  float* kt = bkt.get(D * Tp);
  float* vv = bv.get(T * D);
  float* s = bs.get(MB * lds);
  float* qp = bq.get(MB * D);
  float* o = bo.get(MB * D);
  pack_kv(h, T, Tp, kt, vv);
  const int64_t Tfull = T / KW * KW;
  const V qs = Isa::set1(qscale);
  alignas(64) V rmax[MB];
  alignas(64) V spare[QR];
  float linv[MB];
  for (int64_t m0 = 0; m0 < T; m0 += MB) {
    const int rows = static_cast<int>(std::min<int64_t>(MB, T - m0));
    const int rq = (rows + QR - 1) / QR * QR, rp = (rows + PR - 1) / PR * PR;
    for (int64_t u = m0 + MB; u < std::min<int64_t>(m0 + 2 * MB, T); ++u) prefetch_row(h.q + u * h.ldq);
    for (int r = 0; r < rq; ++r) {  // q block, pre-scaled; rows past T are zeros
      const float* qr = h.q + (m0 + r) * h.ldq;
      for (int d = 0; d < D; d += L)
        Isa::store(qp + r * D + d, r < rows ? Isa::mul(Isa::load(qr + d), qs) : Isa::zero());
      rmax[r] = Isa::set1(-std::numeric_limits<float>::infinity());
    }
    for (int64_t j = 0; j < Tfull; j += KW)
      for (int r = 0; r < rq; r += QR) qk_tile(qp + r * D, kt + j * D, s + r * lds + j, lds, rmax + r);
    if (Tfull < T) {  // last panel: its zero-padded keys must not enter the row maxima
      for (int r = 0; r < rq; r += QR) qk_tile(qp + r * D, kt + Tfull * D, s + r * lds + Tfull, lds, spare);
      for (int r = 0; r < rows; ++r)
        for (int64_t t = Tfull; t < T; ++t) rmax[r] = Isa::max(rmax[r], Isa::set1(s[r * lds + t]));
    }
    for (int r = 0; r < rows; ++r) linv[r] = 1.f / softmax_row(s + r * lds, T, Isa::reduce_max(rmax[r]));
    for (int r = rows; r < rp; ++r) std::memset(s + r * lds, 0, lds * sizeof(float));  // padded rows of P
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
      const int n = static_cast<int>(std::min<int64_t>(TB, T - t0));
      for (int r = 0; r < rp; r += PR) pv_tile(s + r * lds + t0, lds, vv + t0 * D, n, o + r * D, t0 == 0);
    }
    for (int r = 0; r < rows; ++r) {
      const V li = Isa::set1(linv[r]);
      float* orow = h.out + (m0 + r) * h.ldo;
      for (int d = 0; d < D; d += L) Isa::store(orow + d, Isa::mul(Isa::load(o + r * D + d), li));
    }
  }
}
#endif

// Any ISA / head size: one query row at a time (exact softmax, base 2), for the portable builds and tests.
void attend_head_generic(const Head& h, int64_t T, int64_t Dh, float qscale) {
  std::vector<float> sc(static_cast<size_t>(T)), acc(static_cast<size_t>(Dh));
  for (int64_t i = 0; i < T; ++i) {
    const float* qi = h.q + i * h.ldq;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < T; ++t) {
      const float* kt = h.k + t * h.ldk;
      float a = 0.f;
      for (int64_t d = 0; d < Dh; ++d) a += qi[d] * qscale * kt[d];
      sc[t] = a;
      mx = std::max(mx, a);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < T; ++t) sum += (sc[t] = std::exp2(sc[t] - mx));
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < Dh; ++d) acc[d] += sc[t] * h.v[t * h.ldv + d];
    for (int64_t d = 0; d < Dh; ++d) h.out[i * h.ldo + d] = acc[d] / sum;
  }
}
}  // namespace full

// ---------------------------------------------------------------------------------------------------------------
// Opt-in int8 GEMMs of S3Gen's CFM estimator (quantize.W8A8Linear): the activations are quantised per row on the
// fly (symmetric, q = round(x * 127 / max|x|) in [-127, 127]), an int8 x int8 -> int32 GEMM runs (torch._int_mm),
// and one fused pass dequantises: y (+)= acc * s_x[m] * s_w[n] + bias[n]. These two passes are the kernels here.
namespace w8a8 {
// max |x[0..K)| (exact in any order)
inline float row_amax(const float* x, int64_t K) {
  float amax = 0.f;
  int64_t k = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  Isa::V m = Isa::zero();
  for (; k + Isa::L <= K; k += Isa::L) m = Isa::max(m, Isa::abs(Isa::load(x + k)));
  amax = Isa::reduce_max(m);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  return amax;
}

// q[0..K) = round(x * 127 / amax) (nearest even, as torch.round), *s = amax / 127 (0 for an all-zero row)
void quantize_row(const float* x, int64_t K, int8_t* q, float* s) {
  const float amax = row_amax(x, K);
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *s = amax / 127.f;
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 vi = _mm512_set1_ps(inv);
  for (; k + 16 <= K; k += 16)  // cvtps rounds to nearest even (MXCSR default); the int8 narrowing saturates
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vi))));
#elif defined(__AVX2__)
  const __m256 vi = _mm256_set1_ps(inv);
  for (; k + 8 <= K; k += 8) {
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vi));
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
  }
#endif
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(x[k] * inv))));
}

// float -> the nearest bf16 value (ties to even, as c10::BFloat16), returned as a float; NaN unchanged
inline float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return x;
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

// One weight row, quantize.quantize_weight_int8's formula op for op (so the bits match): s = max|w| / 127 (rounded
// to bf16 if asked; 1 for an all-zero row), q = clamp(round(w / s), -127, 127), round half to even. Division and
// rounding are exact IEEE operations in every path; finite weights only (NaN handling is not torch's).
void quantize_weight_row(const float* w, int64_t K, bool bf16, int8_t* q, float* s) {
  float sc = row_amax(w, K) / 127.f;
  if (bf16) sc = round_bf16(sc);
  if (!(sc > 0.f)) sc = 1.f;
  *s = sc;
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(sc), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(w + k), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(v)));
  }
#endif
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(w[k] / sc))));
}

// y[0..N) (+)= acc * (sx * sw[n]) + bias[n]; acc is exact in fp32 (|acc| <= 127^2 K < 2^24 for K <= 1040)
template <bool ACC, bool BIAS>
void dequant_row(const int32_t* __restrict acc, float sx, const float* __restrict sw, const float* __restrict bias,
                 float* __restrict y, int64_t N) {
  for (int64_t n = 0; n < N; ++n) {
    float v = static_cast<float>(acc[n]) * (sx * sw[n]);
    if (BIAS) v += bias[n];
    y[n] = ACC ? y[n] + v : v;
  }
}
}  // namespace w8a8

// ---- S3Gen estimator attention on int8 dot products (opt-in: s3gen_quantize="int8-attn") ----
// Scores: the keys minus their mean over the sequence (a per-query constant shift of the scores, which softmax
// ignores; it centres the channels so no int8 range is spent on a common offset), each key and each pre-scaled query
// row quantised to int8 with its own scale (w8a8::quantize_row); S[i][t] = float(q8_i . k8_t) * sk[t] * sq[i] with
// the integer dot product exact. Softmax in fp32 (base 2), then the probabilities p = 2^(S - max) in (0, 1] are
// rounded to u8 levels p8 = round(255 p) and the row's normaliser is their exact integer sum l. Values: centred per
// channel (out = sum p8 (v - vm) / l + vm, an identity when the same p8 make both sums) and quantised to int8 with one
// scale per channel; out[i][d] = float(sum_t p8[t] v8[t][d]) * sv[d] / l + vm[d], exact integer sums again.
// AVX-512 VNNI (vpdpbusd, u8 x s8: queries are stored + 128, and the 128 * sum(k8_t) that adds is the accumulators'
// start value; p8 is already u8) when the CPU has it; a portable loop with the same integer sums, the same exp2
// polynomial and the same fp32 epilogues everywhere else (bit-identical; slow, for tests).
namespace fq8 {
constexpr int D = 64;

// 2^x for x <= 0 lane for lane as dec::exp2_ps (same clamp, rounding, FMA chain and exact power-of-two scaling)
inline float exp2_poly(float x) {
  x = std::max(x, -150.f);
  const float n = std::nearbyint(x);
  const float f = x - n;
  float p = 1.5403530393381606e-4f;
  p = std::fma(p, f, 1.3333558146428443e-3f);
  p = std::fma(p, f, 9.6181291076284772e-3f);
  p = std::fma(p, f, 5.5504108664821580e-2f);
  p = std::fma(p, f, 2.4022650695910071e-1f);
  p = std::fma(p, f, 6.9314718055994531e-1f);
  p = std::fma(p, f, 1.f);
  return std::ldexp(p, static_cast<int>(n));
}

// q[d] = round((x[d] - m[d]) * inv[d]) clamped to +-127 (nearest even, as w8a8::quantize_row)
inline void quantize_centred(const float* x, const float* m, const float* inv, int64_t n, int8_t* q) {
  int64_t d = 0;
#if defined(__AVX512F__)
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (; d + 16 <= n; d += 16) {
    const __m512 y =
        _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + d), _mm512_loadu_ps(m + d)), _mm512_loadu_ps(inv + d));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + d),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(y, lo), hi))));
  }
#endif
  for (; d < n; ++d)
    q[d] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint((x[d] - m[d]) * inv[d]))));
}

struct Quantized {  // one head
  std::vector<int8_t> k8;  // T x Dh, centred keys
  std::vector<float> sk;   // T
  std::vector<int32_t> ks; // T: sum_d k8[t][d]
  std::vector<int8_t> v8;  // T x Dh, centred values
  std::vector<float> sv;   // Dh: per-channel value scale
  std::vector<float> vm;   // Dh: per-channel value mean
};

void quantize_head(const full::Head& h, int64_t T, int64_t Dh, Quantized& out) {
  std::vector<float> mean(static_cast<size_t>(Dh), 0.f), row(static_cast<size_t>(Dh));
  for (int64_t t = 0; t < T; ++t) {  // first touch of the strided key rows: prefetch ahead (latency-bound otherwise)
    if (t + 8 < T) full::prefetch_row(h.k + (t + 8) * h.ldk);
    for (int64_t d = 0; d < Dh; ++d) mean[d] += h.k[t * h.ldk + d];
  }
  for (int64_t d = 0; d < Dh; ++d) mean[d] /= static_cast<float>(T);
  out.k8.assign(static_cast<size_t>(T * Dh), 0);
  out.sk.assign(static_cast<size_t>(T), 0.f);
  out.ks.assign(static_cast<size_t>(T), 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < Dh; ++d) row[d] = h.k[t * h.ldk + d] - mean[d];
    int8_t* k8 = out.k8.data() + t * Dh;
    w8a8::quantize_row(row.data(), Dh, k8, &out.sk[t]);
    int32_t sum = 0;
    for (int64_t d = 0; d < Dh; ++d) sum += k8[d];
    out.ks[t] = sum;
  }
  out.vm.assign(static_cast<size_t>(Dh), 0.f);
  out.sv.assign(static_cast<size_t>(Dh), 0.f);
  std::vector<float> amax(static_cast<size_t>(Dh), 0.f), inv(static_cast<size_t>(Dh));
  for (int64_t t = 0; t < T; ++t) {
    if (t + 8 < T) full::prefetch_row(h.v + (t + 8) * h.ldv);
    for (int64_t d = 0; d < Dh; ++d) out.vm[d] += h.v[t * h.ldv + d];
  }
  for (int64_t d = 0; d < Dh; ++d) out.vm[d] /= static_cast<float>(T);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < Dh; ++d) amax[d] = std::max(amax[d], std::fabs(h.v[t * h.ldv + d] - out.vm[d]));
  for (int64_t d = 0; d < Dh; ++d) {
    inv[d] = amax[d] > 0.f ? 127.f / amax[d] : 0.f;
    out.sv[d] = amax[d] / 127.f;
  }
  out.v8.assign(static_cast<size_t>(T * Dh), 0);
  for (int64_t t = 0; t < T; ++t)
    quantize_centred(h.v + t * h.ldv, out.vm.data(), inv.data(), Dh, out.v8.data() + t * Dh);
}

// qscale * q row -> int8 row + scale
inline void quantize_query(const float* q, int64_t Dh, float qscale, float* tmp, int8_t* q8, float* sq) {
  for (int64_t d = 0; d < Dh; ++d) tmp[d] = q[d] * qscale;
  w8a8::quantize_row(tmp, Dh, q8, sq);
}

// Portable: one query row at a time; the integer sums, exp2 and epilogues of the VNNI path.
void attend_head_portable(const full::Head& h, int64_t T, int64_t Dh, float qscale) {
  Quantized qh;
  quantize_head(h, T, Dh, qh);
  std::vector<float> sc(static_cast<size_t>(T)), tmp(static_cast<size_t>(Dh));
  std::vector<int32_t> p8(static_cast<size_t>(T));
  std::vector<int8_t> q8(static_cast<size_t>(Dh));
  for (int64_t i = 0; i < T; ++i) {
    float sq = 0.f;
    quantize_query(h.q + i * h.ldq, Dh, qscale, tmp.data(), q8.data(), &sq);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < T; ++t) {
      const int8_t* k8 = qh.k8.data() + t * Dh;
      int32_t a = 0;
      for (int64_t d = 0; d < Dh; ++d) a += static_cast<int32_t>(q8[d]) * k8[d];
      sc[t] = static_cast<float>(a) * qh.sk[t] * sq;
      mx = std::max(mx, sc[t]);
    }
    int32_t l = 0;
    for (int64_t t = 0; t < T; ++t) l += (p8[t] = static_cast<int32_t>(std::nearbyint(exp2_poly(sc[t] - mx) * 255.f)));
    const float linv = 1.f / static_cast<float>(l);  // l >= 255: the maximum's own level
    for (int64_t d = 0; d < Dh; ++d) {
      int32_t a = 0;
      for (int64_t t = 0; t < T; ++t) a += p8[t] * qh.v8[t * Dh + d];
      h.out[i * h.ldo + d] = std::fma(static_cast<float>(a) * qh.sv[d], linv, qh.vm[d]);
    }
  }
}

#if defined(__AVX512F__) && defined(__GNUC__)
#define CBF_HAVE_VNNI_PATH 1
constexpr int QR = 12, KW = 32, MB = 48, PQ = 6;  // Q K^T tile rows, keys per panel, rows per block, P V tile rows

// acc += per 32-bit lane, the 4 products of a's u8 and b's s8 bytes. Inline asm rather than _mm512_dpbusd_epi32:
// GCC 12 spills the 24 accumulators of the intrinsic's tile to the stack on every step (measured: no faster than fp32).
__attribute__((target("avx512f,avx512vnni")))
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

inline __m512i bcast4(const uint8_t* p) {  // 4 bytes as one broadcast 32-bit word
  int32_t w;
  std::memcpy(&w, p, 4);
  return _mm512_set1_epi32(w);
}

// S[r][0..32) for r < QR: int32 accumulators start at -128 ks[t], add (q8 + 128) . k8 over 16 groups of 4 channels
// (kp: the panel, 16 groups x 2 halves x 16 keys x 4 bytes), then float(acc) * sk[t] * sq[r]; rmax[r] tracks maxima.
__attribute__((target("avx512f,avx512vnni")))
inline void qk_tile(const uint8_t* qu, const int8_t* kp, const int32_t* ks, const float* sk, const float* sq,
                    float* s, int64_t lds, __m512* rmax) {
  const __m512i c0 = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(_mm512_loadu_si512(ks), 7));
  const __m512i c1 = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(_mm512_loadu_si512(ks + 16), 7));
  __m512i acc[QR][2];
  for (int r = 0; r < QR; ++r) {
    acc[r][0] = c0;
    acc[r][1] = c1;
  }
  for (int g = 0; g < D / 4; ++g) {
    const __m512i b0 = _mm512_loadu_si512(kp + g * 128), b1 = _mm512_loadu_si512(kp + g * 128 + 64);
    for (int r = 0; r < QR; ++r) {
      const __m512i a = bcast4(qu + r * D + 4 * g);
      acc[r][0] = dpbusd(acc[r][0], a, b0);
      acc[r][1] = dpbusd(acc[r][1], a, b1);
    }
  }
  const __m512 s0 = _mm512_loadu_ps(sk), s1 = _mm512_loadu_ps(sk + 16);
  for (int r = 0; r < QR; ++r) {
    const __m512 qv = _mm512_set1_ps(sq[r]);
    const __m512 v0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][0]), s0), qv);
    const __m512 v1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][1]), s1), qv);
    _mm512_storeu_ps(s + r * lds, v0);
    _mm512_storeu_ps(s + r * lds + 16, v1);
    rmax[r] = _mm512_max_ps(rmax[r], _mm512_max_ps(v0, v1));
  }
}

// p8[t] = round(255 * 2^(s[t] - mx)) for t < T (u8); returns their sum
inline int32_t softmax_row_u8(const float* sr, int64_t T, float mx, uint8_t* p8) {
  const __m512 mv = _mm512_set1_ps(mx), k255 = _mm512_set1_ps(255.f);
  __m512i sum = _mm512_setzero_si512();
  int64_t t = 0;
  for (; t + 16 <= T; t += 16) {
    const __m512 e = dec::exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(sr + t), mv));
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(e, k255));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p8 + t), _mm512_cvtusepi32_epi8(q));
    sum = _mm512_add_epi32(sum, q);
  }
  for (; t < T; t += 16) {
    const __mmask16 m = Isa::mask(T - t);
    const __m512 e = dec::exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sr + t), mv));
    const __m512i q = _mm512_maskz_cvtps_epi32(m, _mm512_mul_ps(e, k255));
    _mm_mask_storeu_epi8(p8 + t, m, _mm512_cvtusepi32_epi8(q));
    sum = _mm512_add_epi32(sum, q);
  }
  return _mm512_reduce_add_epi32(sum);
}

// out[r][0..64) = float(sum_t p8[r][t] v8[t][..]) * sv * linv[r] + vm for r < rows (of PQ); vp: groups of 4 keys x
// 64 channels x 4 bytes; p8 rows of ldp bytes, zero past the keys
__attribute__((target("avx512f,avx512vnni")))
inline void pv_tile(const uint8_t* p8, int64_t ldp, const int8_t* vp, int64_t groups, const float* sv,
                    const float* vm, const float* linv, float* out, int64_t ldo, int rows) {
  __m512i acc[PQ][4];
  for (int r = 0; r < PQ; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* vg = vp + g * 256;
    const __m512i b0 = _mm512_loadu_si512(vg), b1 = _mm512_loadu_si512(vg + 64),
                  b2 = _mm512_loadu_si512(vg + 128), b3 = _mm512_loadu_si512(vg + 192);
    for (int r = 0; r < PQ; ++r) {
      const __m512i a = bcast4(p8 + r * ldp + 4 * g);
      acc[r][0] = dpbusd(acc[r][0], a, b0);
      acc[r][1] = dpbusd(acc[r][1], a, b1);
      acc[r][2] = dpbusd(acc[r][2], a, b2);
      acc[r][3] = dpbusd(acc[r][3], a, b3);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const __m512 li = _mm512_set1_ps(linv[r]);
    for (int j = 0; j < 4; ++j)
      _mm512_storeu_ps(out + r * ldo + 16 * j,
                       _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][j]), _mm512_loadu_ps(sv + 16 * j)),
                                       li, _mm512_loadu_ps(vm + 16 * j)));
  }
}

__attribute__((target("avx512f,avx512vnni")))
void attend_head_vnni(const full::Head& h, int64_t T, float qscale) {
  thread_local full::Buf bs;
  thread_local std::vector<int8_t> kp, vp;
  thread_local std::vector<int32_t> ksp;
  thread_local std::vector<float> skp;
  thread_local std::vector<uint8_t> p8;
  Quantized qh;
  quantize_head(h, T, D, qh);
  const int64_t Tp = (T + KW - 1) / KW * KW, T4 = (T + 3) / 4 * 4;
  // (thread_local vectors: their pointers are taken once; a byte store may alias them, and every reload of a
  // thread_local in a shared library is a __tls_get_addr call: measured 2.6 ms per call for the packing below)
  kp.assign(static_cast<size_t>(Tp * D), 0);  // key panels of KW: [group of 4 channels][half][lane][4 channels]
  vp.assign(static_cast<size_t>(T4 * D), 0);  // value groups of 4 keys: [channel chunk of 16][lane][4 keys]
  ksp.assign(static_cast<size_t>(Tp), 0);
  skp.assign(static_cast<size_t>(Tp), 0.f);
  p8.assign(static_cast<size_t>(MB * T4), 0);  // rows past the block's and bytes past T stay 0
  int8_t* const kpp = kp.data();
  int8_t* const vpp = vp.data();
  int32_t* const ks = ksp.data();
  float* const sk = skp.data();
  uint8_t* const pp = p8.data();
  const int8_t* const k8 = qh.k8.data();
  const int8_t* const v8 = qh.v8.data();
  for (int64_t t = 0; t < T; ++t) {
    int8_t* panel = kpp + (t / KW) * (KW * D);
    const int64_t half = (t % KW) / 16, lane = t % 16;
    for (int g = 0; g < D / 4; ++g) std::memcpy(panel + g * 128 + half * 64 + lane * 4, k8 + t * D + 4 * g, 4);
    ks[t] = qh.ks[t];
    sk[t] = qh.sk[t];
    int8_t* vg = vpp + (t / 4) * (4 * D) + t % 4;
    for (int d = 0; d < D; ++d) vg[4 * d] = v8[t * D + d];
  }
  const int64_t lds = Tp + 16;
  float* s = bs.get(MB * lds);
  alignas(64) uint8_t qu[MB * D];
  alignas(64) int8_t q8[D];
  alignas(64) float tmp[D];
  float sq[MB], linv[MB];
  alignas(64) __m512 rmax[MB];
  alignas(64) __m512 spare[QR];
  const int64_t Tfull = T / KW * KW;
  for (int64_t m0 = 0; m0 < T; m0 += MB) {
    const int rows = static_cast<int>(std::min<int64_t>(MB, T - m0));
    const int rq = (rows + QR - 1) / QR * QR;
    for (int r = 0; r < rq; ++r) {
      if (r < rows) {
        quantize_query(h.q + (m0 + r) * h.ldq, D, qscale, tmp, q8, &sq[r]);
      } else {
        std::memset(q8, 0, D);
        sq[r] = 0.f;
      }
      for (int d = 0; d < D; ++d) qu[r * D + d] = static_cast<uint8_t>(static_cast<int32_t>(q8[d]) + 128);
      rmax[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    }
    for (int64_t j = 0; j < Tfull; j += KW)
      for (int r = 0; r < rq; r += QR)
        qk_tile(qu + r * D, kpp + j * D, ks + j, sk + j, sq + r, s + r * lds + j, lds, rmax + r);
    if (Tfull < T) {  // last panel: its zero-padded keys must not enter the row maxima
      for (int r = 0; r < rq; r += QR)
        qk_tile(qu + r * D, kpp + Tfull * D, ks + Tfull, sk + Tfull, sq + r, s + r * lds + Tfull, lds, spare);
      for (int r = 0; r < rows; ++r)
        for (int64_t t = Tfull; t < T; ++t) rmax[r] = _mm512_max_ps(rmax[r], _mm512_set1_ps(s[r * lds + t]));
    }
    for (int r = 0; r < rows; ++r)
      linv[r] = 1.f / static_cast<float>(
                          softmax_row_u8(s + r * lds, T, _mm512_reduce_max_ps(rmax[r]), pp + r * T4));
    if (rows < MB) std::memset(pp + rows * T4, 0, (MB - rows) * T4);  // the last block's padded rows
    for (int r = 0; r < rows; r += PQ)
      pv_tile(pp + r * T4, T4, vpp, T4 / 4, qh.sv.data(), qh.vm.data(), linv + r,
              h.out + (m0 + r) * h.ldo, h.ldo, std::min(PQ, rows - r));
  }
}
#endif
}  // namespace fq8

// ---- bf16 full attention on AMX tiles: the estimator's attention in s3gen_quantize="bf16" ------------------------
// y (B, T, H, 64) bf16 = softmax(q k^T * scale) v for bf16 q, k, v (B, T, H, 64) views, on CPUs with AMX-BF16
// (Sapphire Rapids and later; Linux must grant the tile state: arch_prctl ARCH_REQ_XCOMP_PERM). Per (batch, head):
// K is repacked once into the tiles' pair-interleaved layout (a B tile holds 16 pairs of dims x 16 keys), V likewise
// (16 pairs of keys x 16 dims); then for each block of 16 queries the scores S (16 x T, fp32) come from
// `tdpbf16ps` (2 per 16 keys: dims 0-31 and 32-63; exact bf16 products, fp32 sums), a base-2 softmax in AVX-512
// (scale folded into the exponent, max over the row, sum of the fp32 exponentials) writes the unnormalised
// probabilities P in bf16, and O (16 x 64) = P V runs on 4 accumulator tiles; the output row is O / sum, rounded to
// bf16. Numbers: those of SDPA's bf16 CPU kernel in kind (fp32 scores and softmax, bf16 P, fp32 sums), not bit for
// bit (summation order, exp polynomial).
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 11) && defined(__linux__)
#define CBF_HAVE_AMX_PATH 1
namespace fbf {
constexpr int64_t D = 64;   // head size
constexpr int64_t QB = 16;  // queries per block (tile rows)

// AMX-BF16 + AVX512-BF16 on this CPU and the tile state granted by the kernel; CHATTERBOX_FAST_CPU_AMX=0: never
bool amx_usable() {
  static const bool yes = [] {
    const char* env = std::getenv("CHATTERBOX_FAST_CPU_AMX");
    if (env != nullptr && env[0] == '0') return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, amx_bf16 = (d >> 22) & 1u;
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    if (!__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) return false;
    const bool avx512_bf16 = (a1 >> 5) & 1u;
    if (!(tile && amx_bf16 && avx512_bf16)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return yes;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

struct HeadBf {  // one (batch, head): bf16 rows (as uint16) and row strides in elements
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  int64_t ldq, ldk, ldv, ldo;
};

struct Scratch {  // per thread, grown as needed
  std::vector<uint32_t> kp;  // (nkb, 2, 16 pairs, 16 keys) dim pairs of K
  std::vector<uint32_t> vp;  // (nkp, 4, 16 key pairs, 16 dims) key pairs of V
  std::vector<float> s;      // (16, T64) scores (keys padded to a multiple of 64)
  std::vector<uint16_t> p;   // (16, T64) bf16 probabilities (unnormalised), zero past T
  std::vector<uint16_t> qb;  // (16, 64) the last block's queries, zero-padded
  std::vector<float> o;      // (16, 64) P V
};

// 2^x for x <= 0 to 7.8e-5 relative (degree-3 polynomial fitted to 2^f on [-0.5, 0.5] by relative-error least
// squares on Chebyshev nodes): the probabilities are rounded to bf16 (2^-9) right after, so dec::exp2_ps's 1e-7
// buys nothing. A common relative error of all of a row's values cancels (P is divided by their sum). No clamp: x is
// finite, and scalef of a huge negative n gives 0.
inline __m512 exp2_bf(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.05508868380751114f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24260405145947936f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6932762416819607f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999289403695112f));
  return _mm512_scalef_ps(p, n);
}

__attribute__((target("amx-tile,amx-bf16,avx512bf16"))) void attend_head_amx(const HeadBf& h, int64_t T, float qs,
                                                                              Scratch& sc) {
  // keys padded to a multiple of 64 (zero keys and values; their scores are never read): 4 blocks of 16 keys for
  // the scores and 2 of 32 for P V per step, so that independent tiles keep the AMX unit busy
  const int64_t T64 = (T + 63) / 64 * 64, nkb = T64 / 16, nkp = T64 / 32;
  sc.kp.resize(nkb * 2 * 256);  // every word written below
  sc.vp.resize(nkp * 4 * 256);
  std::memset(sc.vp.data() + (T / 32) * 1024, 0, (nkp - T / 32) * 1024 * 4);  // blocks with missing keys
  sc.s.resize(QB * T64);
  sc.p.assign(QB * T64, 0);
  sc.qb.resize(QB * D);
  sc.o.resize(QB * D);
  for (int64_t kb = 0; kb < nkb; ++kb) {  // K: tile (kb, j), row r = dims 32 j + 2r, + 1 of the block's 16 keys
    __m512 r0[16], r1[16];  // key n's pairs 0-15 / 16-31 (as 32-bit words)
    for (int64_t n = 0; n < 16; ++n) {
      const bool in = kb * 16 + n < T;
      const uint16_t* kr = h.k + (kb * 16 + n) * h.ldk;
      r0[n] = in ? _mm512_loadu_ps(kr) : _mm512_setzero_ps();
      r1[n] = in ? _mm512_loadu_ps(kr + 32) : _mm512_setzero_ps();
    }
    Isa::transpose(r0);  // r0[p] = pair p of keys 0..15
    Isa::transpose(r1);
    float* dst = reinterpret_cast<float*>(sc.kp.data() + kb * 512);
    for (int64_t p = 0; p < 16; ++p) {
      _mm512_storeu_ps(dst + p * 16, r0[p]);
      _mm512_storeu_ps(dst + 256 + p * 16, r1[p]);
    }
  }
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                      36, 4, 35, 3, 34, 2, 33, 1, 32, 0);  // a[0], b[0], a[1], b[1], ... a[15], b[15]
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));        // the same for elements 16..31
  for (int64_t n = 0; n < T; n += 2) {  // V: tile (n / 32, g), row (n % 32) / 2 = dims 16 g .. + 15 of keys n, n + 1
    const uint16_t* va = h.v + n * h.ldv;
    const bool in = n + 1 < T;
    const __m512i a0 = _mm512_loadu_si512(va), a1 = _mm512_loadu_si512(va + 32);
    const __m512i b0 = in ? _mm512_loadu_si512(va + h.ldv) : _mm512_setzero_si512();
    const __m512i b1 = in ? _mm512_loadu_si512(va + h.ldv + 32) : _mm512_setzero_si512();
    uint32_t* dst = sc.vp.data() + (n / 32) * 1024 + ((n % 32) / 2) * 16;
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a0, lo, b0));
    _mm512_storeu_si512(dst + 256, _mm512_permutex2var_epi16(a0, hi, b0));
    _mm512_storeu_si512(dst + 512, _mm512_permutex2var_epi16(a1, lo, b1));
    _mm512_storeu_si512(dst + 768, _mm512_permutex2var_epi16(a1, hi, b1));
  }
  const uint32_t* kp = sc.kp.data();
  const uint32_t* vp = sc.vp.data();
  float* s = sc.s.data();
  uint16_t* p = sc.p.data();
  float* o = sc.o.data();
  const __m512 vqs = _mm512_set1_ps(qs);
  for (int64_t m0 = 0; m0 < T; m0 += QB) {
    const int64_t rows = std::min(QB, T - m0);
    const uint16_t* qsrc = h.q + m0 * h.ldq;
    int64_t ldq = h.ldq;
    if (rows < QB) {  // the last block: its rows in a zero-padded copy
      std::memset(sc.qb.data(), 0, QB * D * 2);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(sc.qb.data() + r * D, qsrc + r * h.ldq, D * 2);
      qsrc = sc.qb.data();
      ldq = D;
    }
    _tile_loadd(1, qsrc, ldq * 2);       // queries, dims 0-31
    _tile_loadd(2, qsrc + 32, ldq * 2);  // dims 32-63
    for (int64_t kb = 0; kb < nkb; kb += 4) {  // 4 blocks of 16 keys in flight: accumulators 0, 4, 5, 6
      const uint32_t* kt = kp + kb * 512;
      _tile_zero(0);
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
// C += scores of the queries (tiles 1, 2: dims 0-31, 32-63) against the 16 keys of K tiles at kt + off
// (tile numbers must be literals: the intrinsics are macros that paste them into the instruction)
#define CBF_QK(C, off)                   \
  _tile_loadd(3, kt + (off), 64);        \
  _tile_dpbf16ps(C, 1, 3);               \
  _tile_loadd(7, kt + (off) + 256, 64);  \
  _tile_dpbf16ps(C, 2, 7)
      CBF_QK(0, 0);
      CBF_QK(4, 512);
      CBF_QK(5, 1024);
      CBF_QK(6, 1536);
#undef CBF_QK
      _tile_stored(0, s + kb * 16, T64 * 4);
      _tile_stored(4, s + kb * 16 + 16, T64 * 4);
      _tile_stored(5, s + kb * 16 + 32, T64 * 4);
      _tile_stored(6, s + kb * 16 + 48, T64 * 4);
    }
    float linv[QB];
    for (int64_t r = 0; r < rows; ++r) {  // base-2 softmax of the row, unnormalised exponentials to bf16
      float* sr = s + r * T64;
      uint16_t* pr = p + r * T64;
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      int64_t t = 0;
      for (; t + 16 <= T; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + t));
      const __mmask16 tail = static_cast<__mmask16>((1u << (T - t)) - 1u);
      if (t < T) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, sr + t));
      const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * qs);
      __m512 sum = _mm512_setzero_ps();
      for (t = 0; t + 16 <= T; t += 16) {
        const __m512 e = exp2_bf(_mm512_fmsub_ps(_mm512_loadu_ps(sr + t), vqs, mv));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + t), (__m256i)_mm512_cvtneps_pbh(e));
      }
      if (t < T) {
        const __m512 e = _mm512_maskz_mov_ps(tail, exp2_bf(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, sr + t), vqs,
                                                                           mv)));
        sum = _mm512_add_ps(sum, e);
        _mm256_mask_storeu_epi16(pr + t, tail, (__m256i)_mm512_cvtneps_pbh(e));
      }
      linv[r] = 1.f / _mm512_reduce_add_ps(sum);
    }
    if (rows < QB) std::memset(p + rows * T64, 0, (QB - rows) * T64 * 2);
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t kb = 0; kb < nkp; kb += 2) {  // P tiles 0 and 1 and V tiles 2 and 3 alternate
      const uint32_t* vt = vp + kb * 1024;
// O (tiles 4-7: dims 0-15, .., 48-63) += P (tile A: 16 queries x 32 keys at column c) V (4 tiles at vt + off)
#define CBF_PV(A, c, off)                 \
  _tile_loadd(A, p + (c), T64 * 2);       \
  _tile_loadd(2, vt + (off), 64);         \
  _tile_dpbf16ps(4, A, 2);                \
  _tile_loadd(3, vt + (off) + 256, 64);   \
  _tile_dpbf16ps(5, A, 3);                \
  _tile_loadd(2, vt + (off) + 512, 64);   \
  _tile_dpbf16ps(6, A, 2);                \
  _tile_loadd(3, vt + (off) + 768, 64);   \
  _tile_dpbf16ps(7, A, 3)
      CBF_PV(0, kb * 32, 0);
      CBF_PV(1, kb * 32 + 32, 1024);
#undef CBF_PV
    }
    _tile_stored(4, o, D * 4);
    _tile_stored(5, o + 16, D * 4);
    _tile_stored(6, o + 32, D * 4);
    _tile_stored(7, o + 48, D * 4);
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 li = _mm512_set1_ps(linv[r]);
      uint16_t* yr = h.out + (m0 + r) * h.ldo;
      for (int64_t c = 0; c < D; c += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + c),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + r * D + c), li)));
    }
  }
}

__attribute__((target("amx-tile"))) void tiles_on() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  asm volatile("" : : "r"(&cfg) : "memory");  // GCC 12 drops the stores above as dead without this (ldtilecfg reads)
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void tiles_off() { _tile_release(); }
}  // namespace fbf
#endif

bool attention_bf16_amx() {  // full_attention_bf16 can run (AVX-512 build, GCC >= 11, AMX-BF16 usable)
#if defined(CBF_HAVE_AMX_PATH)
  return fbf::amx_usable();
#else
  return false;
#endif
}

bool attention_int8_fast() {  // the VNNI path applies (AVX-512 build on a CPU with AVX512-VNNI)
#if defined(CBF_HAVE_VNNI_PATH)
  return dec::cpu_has_vnni();
#else
  return false;
#endif
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4 && t->stride(3) == 1, op,
                ": q, k and v must be (B, T, H, D) float32 CPU tensors with a contiguous last dim, got ", t->sizes(),
                " ", t->scalar_type(), " strides ", t->strides());
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": q, k and v must have the same shape, got ", q.sizes(), " and ",
                t->sizes());
  }
  TORCH_CHECK(q.size(1) >= 1 && q.size(3) >= 1, op, ": empty sequence or head, got ", q.sizes());
  TORCH_CHECK(q.size(1) < (int64_t{1} << 24) && q.stride(1) < (int64_t{1} << 24) && k.stride(1) < (int64_t{1} << 24),
              op, ": sequence or row stride too large");
}

// Checks q, k, v (B, T, H, D), allocates the contiguous (B, T, H, D) output and runs attend(head, T, D, qscale) for
// every (batch, head) over the ATen thread pool; qscale = scale / ln 2 (base-2 softmax).
template <class F>
at::Tensor per_head(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, const char* op,
                    F attend) {
  check_qkv(q, k, v, op);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  at::Tensor y = at::empty({B, T, H, Dh}, q.options());
  const float qscale = static_cast<float>(scale * 1.4426950408889634);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / H, hh = g % H;
      const full::Head h{qp + b * q.stride(0) + hh * q.stride(2), kp + b * k.stride(0) + hh * k.stride(2),
                         vp + b * v.stride(0) + hh * v.stride(2), yp + (b * T * H + hh) * Dh,
                         q.stride(1), k.stride(1), v.stride(1), H * Dh};
      attend(h, T, Dh, qscale);
    }
  });
  return y;
}

// force_portable: the portable loop even where the VNNI path applies (tests compare the two)
at::Tensor full_attention_int8(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                               bool force_portable) {
  TORCH_CHECK(q.dim() != 4 || q.size(3) <= 1040, "full_attention_int8: head size ", q.size(3),
              " > 1040 (int32 dot products could overflow)");
  TORCH_CHECK(q.dim() != 4 || q.size(1) <= 65536, "full_attention_int8: sequence of ", q.size(1),
              " > 65536 keys (the int32 P V sums, up to 255 * 127 per key, could overflow)");
  const bool fast = !force_portable && attention_int8_fast();
  auto attend = [fast](const full::Head& h, int64_t T, int64_t Dh, float qs) {
#if defined(CBF_HAVE_VNNI_PATH)
    if (fast && Dh == fq8::D) return fq8::attend_head_vnni(h, T, qs);
#endif
    fq8::attend_head_portable(h, T, Dh, qs);
  };
  return per_head(q, k, v, scale, "full_attention_int8", attend);
}

at::Tensor full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  return per_head(q, k, v, scale, "full_attention", [](const full::Head& h, int64_t T, int64_t Dh, float qs) {
#if defined(__AVX512F__) || defined(__AVX2__)
    if (Dh == full::D) return full::attend_head(h, T, qs);
#endif
    full::attend_head_generic(h, T, Dh, qs);
  });
}

// q, k, v (B, T, H, 64) bfloat16 views with a contiguous last dim -> (B, T, H, 64) bfloat16 (contiguous); AMX only
at::Tensor full_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->stride(3) == 1 &&
                    t->sizes() == q.sizes(),
                "full_attention_bf16: q, k and v must be (B, T, H, 64) bfloat16 CPU tensors of one shape with a "
                "contiguous last dim, got ", t->sizes(), " ", t->scalar_type(), " strides ", t->strides());
  }
  TORCH_CHECK(q.size(3) == 64 && q.size(1) >= 1, "full_attention_bf16: head size 64 and T >= 1 expected, got ",
              q.sizes());
  TORCH_CHECK(attention_bf16_amx(), "full_attention_bf16: needs a CPU with AMX-BF16 (and the tile state granted by "
              "the OS) and an AVX-512 build with GCC >= 11");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  at::Tensor y = at::empty({B, T, H, 64}, q.options());
#if defined(CBF_HAVE_AMX_PATH)
  const float qs = static_cast<float>(scale * 1.4426950408889634);
  const auto* qp = static_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = static_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = static_cast<const uint16_t*>(v.data_ptr());
  auto* yp = static_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, B * H, 1, [&](int64_t g0, int64_t g1) {
    static thread_local fbf::Scratch sc;
    fbf::tiles_on();
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / H, hh = g % H;
      const fbf::HeadBf h{qp + b * q.stride(0) + hh * q.stride(2), kp + b * k.stride(0) + hh * k.stride(2),
                          vp + b * v.stride(0) + hh * v.stride(2), yp + (b * T * H + hh) * 64,
                          q.stride(1), k.stride(1), v.stride(1), H * 64};
      fbf::attend_head_amx(h, T, qs, sc);
    }
    fbf::tiles_off();
  });
#endif
  return y;
}

void check_common(const at::Tensor& x, const at::Tensor& w, at::ScalarType wdtype, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous (M, K) float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == wdtype && w.is_contiguous(), op, ": w must be a contiguous (N, K) ",
              wdtype, " tensor, got ", w.sizes(), " ", w.scalar_type());
  TORCH_CHECK(w.size(1) == x.size(1), op, ": x has K = ", x.size(1), " but w has K = ", w.size(1));
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  check_common(x, w, at::kChar, "int8_linear");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.size(0) == w.size(0) && scale.device().is_cpu(),
              "int8_linear: scale must be a contiguous (N,) float32 CPU tensor, got ", scale.sizes(), " ",
              scale.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  linear_kernel<Int8Weight>(x.data_ptr<float>(), static_cast<const int8_t*>(w.data_ptr()), scale.data_ptr<float>(),
                            y.data_ptr<float>(), M, N, K);
  return y;
}

// x (M, K) float32 and a packed weight (N / NB, K / c, NB, c) of dtype wdtype (c = one 64-byte line of it)
void check_packed(const at::Tensor& x, const at::Tensor& w, at::ScalarType wdtype, int64_t c, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat &&
                  x.is_contiguous(),
              op, ": x must be a contiguous (M, K) float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == wdtype && w.is_contiguous() && w.size(2) == NB && w.size(3) == c &&
                  w.size(1) * c == x.size(1),
              op, ": w must be a contiguous (N / ", NB, ", K / ", c, ", ", NB, ", ", c, ") ", wdtype,
              " tensor with K = ", x.size(1), ", got ", w.sizes(), " ", w.scalar_type());
}

// w packed (N / NB, K / 64, NB, 64) int8 (quantize.pack_weight); the same result as int8_linear on the row-major w
at::Tensor int8_linear_packed(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  check_packed(x, w, at::kChar, 64, "int8_linear_packed");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * NB;
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(0) == N &&
                  scale.device().is_cpu(),
              "int8_linear_packed: scale must be a contiguous (", N, ",) float32 CPU tensor, got ", scale.sizes());
  at::Tensor y = at::empty({M, N}, x.options());
  int8_linear_packed_kernel(x.data_ptr<float>(), static_cast<const int8_t*>(w.data_ptr()), scale.data_ptr<float>(),
                            y.data_ptr<float>(), M, N, K);
  return y;
}

// w packed (N / NB, K / 32, NB, 32) bf16 (quantize.pack_weight); the same result as bf16_linear on the row-major w
at::Tensor bf16_linear_packed(const at::Tensor& x, const at::Tensor& w) {
  check_packed(x, w, at::kBFloat16, 32, "bf16_linear_packed");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * NB;
  at::Tensor y = at::empty({M, N}, x.options());
  linear_kernel_packed<Bf16Weight>(x.data_ptr<float>(), static_cast<const uint16_t*>(w.data_ptr()), nullptr,
                                   y.data_ptr<float>(), M, N, K);
  return y;
}

// fp32 weights: the same kernel as the fp32 layer linears of decode_layers, so every row of x gets the same bits
// whatever M is (T3's speech head in the fused decode step and in the speculative decoder's k-token check)
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w) {
  check_common(x, w, at::kFloat, "f32_linear");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  linear_kernel<F32Weight>(x.data_ptr<float>(), w.data_ptr<float>(), nullptr, y.data_ptr<float>(), M, N, K);
  return y;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  check_common(x, w, at::kBFloat16, "bf16_linear");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  linear_kernel<Bf16Weight>(x.data_ptr<float>(), static_cast<const uint16_t*>(w.data_ptr()), nullptr,
                            y.data_ptr<float>(), M, N, K);
  return y;
}

// x (M, K) float32, rows contiguous -> (q (M, K) int8, s (M,) float32): per-row symmetric int8
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "quantize_rows: x must be an (M, K) float32 CPU tensor with contiguous rows, got ", x.sizes(), " ",
              x.scalar_type(), " strides ", x.strides());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = static_cast<int8_t*>(q.data_ptr());
  float* sp = s.data_ptr<float>();
  const int64_t ld = x.stride(0);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) w8a8::quantize_row(xp + m * ld, K, qp + m * K, sp + m);
  });
  return {q, s};
}

// w (N, K) float32 with contiguous rows -> (q (N, K) int8, scale (N,) float32): T3's weight-only int8 (see
// w8a8::quantize_weight_row), one pass per row over the ATen pool: T3's 0.5 B layer weights in 0.2-0.3 s against
// 0.7-0.8 s for the same formula as PyTorch ops (2 threads; the speculative draft is built at every load)
std::tuple<at::Tensor, at::Tensor> quantize_weight_int8(const at::Tensor& w, bool bf16_scales) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.stride(1) == 1,
              "quantize_weight_int8: w must be an (N, K) float32 CPU tensor with contiguous rows, got ", w.sizes(),
              " ", w.scalar_type(), " strides ", w.strides());
  const int64_t N = w.size(0), K = w.size(1), ld = w.stride(0);
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor s = at::empty({N}, w.options());
  const float* wp = w.data_ptr<float>();
  int8_t* qp = static_cast<int8_t*>(q.data_ptr());
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) w8a8::quantize_weight_row(wp + n * ld, K, bf16_scales, qp + n * K, sp + n);
  });
  return {q, s};
}

// checks acc (M, N) int32, sx (M,), sw (N,), bias (N,) or None; returns the bias pointer (or null)
const float* check_dequant(const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& sw,
                           const c10::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(acc.device().is_cpu() && acc.scalar_type() == at::kInt && acc.dim() == 2 && acc.is_contiguous(), op,
              ": acc must be a contiguous (M, N) int32 CPU tensor, got ", acc.sizes(), " ", acc.scalar_type());
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(sx.scalar_type() == at::kFloat && sx.dim() == 1 && sx.size(0) == M && sx.is_contiguous() &&
                  sx.device().is_cpu(), op, ": sx must be a contiguous (", M, ",) float32 CPU tensor, got ", sx.sizes());
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.dim() == 1 && sw.size(0) == N && sw.is_contiguous() &&
                  sw.device().is_cpu(), op, ": sw must be a contiguous (", N, ",) float32 CPU tensor, got ", sw.sizes());
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                  bias->device().is_cpu(),
              op, ": bias must be a contiguous (", N, ",) float32 CPU tensor, got ", bias->sizes());
  return bias->data_ptr<float>();
}

// y rows (ldy apart) (+)= acc * sx[:, None] * sw[None, :] + bias, over the ATen pool; inputs already checked
template <bool ACC>
void dequant_into(float* y, int64_t ldy, const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& sw,
                  const float* bp) {
  const int64_t M = acc.size(0), N = acc.size(1);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* sxp = sx.data_ptr<float>();
  const float* swp = sw.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (bp != nullptr)
        w8a8::dequant_row<ACC, true>(ap + m * N, sxp[m], swp, bp, y + m * ldy, N);
      else
        w8a8::dequant_row<ACC, false>(ap + m * N, sxp[m], swp, bp, y + m * ldy, N);
    }
  });
}

// acc (M, N) int32 -> acc * sx[:, None] * sw[None, :] + bias (M, N) float32
at::Tensor dequant_rows(const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& sw,
                        const c10::optional<at::Tensor>& bias) {
  const float* bp = check_dequant(acc, sx, sw, bias, "dequant_rows");
  at::Tensor y = at::empty(acc.sizes(), acc.options().dtype(at::kFloat));
  dequant_into<false>(y.data_ptr<float>(), acc.size(1), acc, sx, sw, bp);
  return y;
}

// y (M, N) float32 with contiguous rows: y += acc * sx[:, None] * sw[None, :] + bias, in place
void dequant_rows_acc_(at::Tensor& y, const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& sw,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 2 && y.stride(1) == 1 &&
                  y.sizes() == acc.sizes(),
              "dequant_rows_acc_: y must be a float32 CPU tensor of acc's shape ", acc.sizes(),
              " with contiguous rows, got ", y.sizes(), " ", y.scalar_type(), " strides ", y.strides());
  const float* bp = check_dequant(acc, sx, sw, bias, "dequant_rows_acc_");
  dequant_into<true>(y.data_ptr<float>(), y.stride(0), acc, sx, sw, bp);
}

// ---------------------------------------------------------------------------------------------------------------
// Row-wise elementwise passes of S3Gen's CFM estimator, each one pass over memory where ATen makes two to four:
// LayerNorm (optionally adding a (C,) vector into x first: the bias of the GEMM that just wrote x, and optionally
// followed by Mish), and bias + exact (erf) GELU in place. fp32; they differ from ATen by float rounding only.
namespace ew {
// e^x (0 below -87, clamped above 88), Cody-Waite reduction and Cephes' expf polynomial: ~1 ulp
#if defined(__AVX512F__) || defined(__AVX2__)
inline Isa::V exp_v(Isa::V x0) {
  using V = Isa::V;
  const V x = Isa::max(Isa::min(x0, Isa::set1(88.f)), Isa::set1(-87.f));
  const V n = Isa::round(Isa::mul(x, Isa::set1(1.44269504088896341f)));
  V r = Isa::fma(n, Isa::set1(-0.693359375f), x);
  r = Isa::fma(n, Isa::set1(2.12194440e-4f), r);
  V p = Isa::set1(1.9875691500e-4f);
  p = Isa::fma(p, r, Isa::set1(1.3981999507e-3f));
  p = Isa::fma(p, r, Isa::set1(8.3334519073e-3f));
  p = Isa::fma(p, r, Isa::set1(4.1665795894e-2f));
  p = Isa::fma(p, r, Isa::set1(1.6666665459e-1f));
  p = Isa::fma(p, r, Isa::set1(5.0000001201e-1f));
  p = Isa::fma(p, Isa::mul(r, r), Isa::add(r, Isa::set1(1.f)));
  return Isa::select_nonneg(Isa::add(x0, Isa::set1(87.f)), Isa::scale2(p, n), Isa::zero());  // 0 below -87
}

// x * tanh(softplus(x)) = x * n / (n + 2), n = e (e + 2), e = e^min(x, 20) (n / (n + 2) is 1 in fp32 above 20)
inline Isa::V mish_v(Isa::V x) {
  const Isa::V e = exp_v(Isa::min(x, Isa::set1(20.f)));
  const Isa::V n = Isa::mul(e, Isa::add(e, Isa::set1(2.f)));
  return Isa::mul(Isa::mul(x, n), Isa::recip(Isa::add(n, Isa::set1(2.f))));
}

// 0.5 x (1 + erf(x / sqrt 2)), erf as Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7, the formula ATen's vectorised
// erf uses): 1 + erf(z) = 2 - q for z >= 0 and q for z < 0, q = t P(t) e^(-z^2), t = 1 / (1 + 0.3275911 |z|)
inline Isa::V gelu_v(Isa::V x) {
  using V = Isa::V;
  const V z = Isa::mul(x, Isa::set1(0.70710678118654752f));
  const V t = Isa::recip(Isa::fma(Isa::set1(0.3275911f), Isa::abs(z), Isa::set1(1.f)));
  V p = Isa::fma(Isa::set1(1.061405429f), t, Isa::set1(-1.453152027f));
  p = Isa::fma(p, t, Isa::set1(1.421413741f));
  p = Isa::fma(p, t, Isa::set1(-0.284496736f));
  p = Isa::fma(p, t, Isa::set1(0.254829592f));
  const V q = Isa::mul(Isa::mul(p, t), exp_v(Isa::sub(Isa::zero(), Isa::mul(z, z))));
  const V one_plus_erf = Isa::select_nonneg(z, Isa::sub(Isa::set1(2.f), q), q);
  return Isa::mul(Isa::mul(Isa::set1(0.5f), x), one_plus_erf);
}
#endif

inline float mish_1(float x) { return x * std::tanh(std::log1p(std::exp(x))); }
inline float gelu_1(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }

// x[0..C) (+= add); y = (x - mean) / sqrt(var + eps) * w + b (then Mish); two passes over the row (L1)
template <bool MISH>
void layer_norm_row(float* x, const float* add, const float* w, const float* b, float eps, int64_t C, float* y) {
  int64_t c = 0;
  float sum = 0.f;
#if defined(__AVX512F__) || defined(__AVX2__)
  using V = Isa::V;
  constexpr int L = Isa::L;
  V vs = Isa::zero();
  for (; c + L <= C; c += L) {
    V v = Isa::load(x + c);
    if (add != nullptr) {
      v = Isa::add(v, Isa::load(add + c));
      Isa::store(x + c, v);
    }
    vs = Isa::add(vs, v);
  }
  sum = Isa::reduce_add(vs);
#endif
  for (; c < C; ++c) {
    if (add != nullptr) x[c] += add[c];
    sum += x[c];
  }
  const float mean = sum / static_cast<float>(C);
  float ss = 0.f;
  c = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const V vm = Isa::set1(mean);
  V vq = Isa::zero();
  for (; c + L <= C; c += L) {
    const V d = Isa::sub(Isa::load(x + c), vm);
    vq = Isa::fma(d, d, vq);
  }
  ss = Isa::reduce_add(vq);
#endif
  for (; c < C; ++c) ss += (x[c] - mean) * (x[c] - mean);
  const float rstd = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
  c = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const V vr = Isa::set1(rstd);
  for (; c + L <= C; c += L) {
    V v = Isa::fma(Isa::mul(Isa::sub(Isa::load(x + c), vm), vr), Isa::load(w + c), Isa::load(b + c));
    if (MISH) v = mish_v(v);
    Isa::store(y + c, v);
  }
#endif
  for (; c < C; ++c) {
    const float v = (x[c] - mean) * rstd * w[c] + b[c];
    y[c] = MISH ? mish_1(v) : v;
  }
}

void bias_gelu_row(float* y, const float* bias, int64_t N) {
  int64_t n = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; n + Isa::L <= N; n += Isa::L) Isa::store(y + n, gelu_v(Isa::add(Isa::load(y + n), Isa::load(bias + n))));
#endif
  for (; n < N; ++n) y[n] = gelu_1(y[n] + bias[n]);
}

// HiFT's Snake, x + sin^2(alpha x) / (alpha + 1e-9), in the reference's order of operations: t = x * alpha,
// s = sin(t), s * s, times inv = 1 / (alpha + 1e-9), plus x. Only sin differs from ATen's (~1 ulp either way).
constexpr float kSinExact = 8192.f;  // |t| below this: the vector sin below; above, std::sin (never seen in HiFT)
#if defined(__AVX512F__) || defined(__AVX2__)
// sin(t)^2 for |t| < kSinExact: t = j pi/2 + r (Cody-Waite, pi/2 in three parts, exact products for |j| < 2^13),
// then Cephes' sinf / cosf polynomials on |r| <= pi/4 (~1 ulp); sin^2 t = sin^2 r for even j, cos^2 r for odd j
inline Isa::V sin_sq_v(Isa::V t) {
  using V = Isa::V;
  const V j = Isa::round(Isa::mul(t, Isa::set1(0.636619772367581343f)));
  V r = Isa::fma(j, Isa::set1(-1.5703125f), t);
  r = Isa::fma(j, Isa::set1(-4.837512969970703125e-4f), r);
  r = Isa::fma(j, Isa::set1(-7.54978995489188216e-8f), r);
  const V r2 = Isa::mul(r, r);
  V s = Isa::fma(Isa::set1(-1.9515295891e-4f), r2, Isa::set1(8.3321608736e-3f));
  s = Isa::fma(s, r2, Isa::set1(-1.6666654611e-1f));
  s = Isa::fma(Isa::mul(s, r2), r, r);
  V c = Isa::fma(Isa::set1(2.443315711809948e-5f), r2, Isa::set1(-1.388731625493765e-3f));
  c = Isa::fma(c, r2, Isa::set1(4.166664568298827e-2f));
  c = Isa::fma(Isa::mul(c, r2), r2, Isa::fma(Isa::set1(-0.5f), r2, Isa::set1(1.f)));
  // j's parity: j - 2 round(j / 2 - 1/4) is 0 or 1
  const V odd = Isa::sub(j, Isa::mul(Isa::set1(2.f), Isa::round(Isa::fma(j, Isa::set1(0.5f), Isa::set1(-0.25f)))));
  return Isa::select_nonneg(Isa::sub(odd, Isa::set1(0.5f)), Isa::mul(c, c), Isa::mul(s, s));
}
#endif

inline float snake_1(float x, float a, float inv) {
  const float s = std::sin(x * a);
  return s * s * inv + x;
}

// y[i] = snake(x[i]) for n elements of one channel (alpha a, inv = 1 / (a + 1e-9)): the (B, C, T) layout's rows
void snake_row_scalar_alpha(const float* x, float a, float inv, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const Isa::V av = Isa::set1(a), iv = Isa::set1(inv);
  for (; i + Isa::L <= n; i += Isa::L) {
    const Isa::V xv = Isa::load(x + i), t = Isa::mul(xv, av);
    if (Isa::reduce_max(Isa::abs(t)) >= kSinExact) break;  // rare: the rest of the row the slow way
    Isa::store(y + i, Isa::add(Isa::mul(sin_sq_v(t), iv), xv));
  }
#endif
  for (; i < n; ++i) y[i] = snake_1(x[i], a, inv);
}

// y[c] = snake(x[c]) for the C channels of one time step (alpha a[c], inv[c]): the channels-last layout's rows
void snake_row_vector_alpha(const float* x, const float* a, const float* inv, float* y, int64_t C) {
  int64_t c = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; c + Isa::L <= C; c += Isa::L) {
    const Isa::V xv = Isa::load(x + c), t = Isa::mul(xv, Isa::load(a + c));
    if (Isa::reduce_max(Isa::abs(t)) >= kSinExact) break;
    Isa::store(y + c, Isa::add(Isa::mul(sin_sq_v(t), Isa::load(inv + c)), xv));
  }
#endif
  for (; c < C; ++c) y[c] = snake_1(x[c], a[c], inv[c]);
}
}  // namespace ew

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.is_contiguous(), op,
              ": x must be a contiguous float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type(), " strides ",
              x.strides());
}

void check_vec(const at::Tensor& v, int64_t n, const char* name, const char* op) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == n &&
                  v.is_contiguous(), op, ": ", name, " must be a contiguous (", n, ",) float32 CPU tensor, got ",
              v.sizes(), " ", v.scalar_type());
}

// LayerNorm over the last dim of x (..., C): y = LN(x + add) * w + b, then Mish if `mish`; `add` (C,) or None is
// added into x in place first (x then holds x + add)
at::Tensor layer_norm_fused(at::Tensor& x, const c10::optional<at::Tensor>& add, const at::Tensor& w,
                            const at::Tensor& b, double eps, bool mish) {
  check_rows(x, "layer_norm_fused");
  const int64_t C = x.size(-1), M = C > 0 ? x.numel() / C : 0;
  check_vec(w, C, "weight", "layer_norm_fused");
  check_vec(b, C, "bias", "layer_norm_fused");
  if (add.has_value()) check_vec(*add, C, "add", "layer_norm_fused");
  TORCH_CHECK(C >= 1, "layer_norm_fused: empty rows, got ", x.sizes());
  at::Tensor y = at::empty_like(x);
  float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* ap = add.has_value() ? add->data_ptr<float>() : nullptr;
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / C), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (mish)
        ew::layer_norm_row<true>(xp + m * C, ap, wp, bp, e, C, yp + m * C);
      else
        ew::layer_norm_row<false>(xp + m * C, ap, wp, bp, e, C, yp + m * C);
    }
  });
  return y;
}

// y (..., N) = gelu(y + bias), exact (erf) GELU, in place
void bias_gelu_(at::Tensor& y, const at::Tensor& bias) {
  check_rows(y, "bias_gelu_");
  const int64_t N = y.size(-1), M = N > 0 ? y.numel() / N : 0;
  check_vec(bias, N, "bias", "bias_gelu_");
  float* yp = y.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) ew::bias_gelu_row(yp + m * N, bp, N);
  });
}

// HiFT's Snake activation of x (B, C, T), alpha (C,): x + sin^2(alpha x) / (alpha + 1e-9), one pass, a new tensor
// in x's memory layout: contiguous (B, C, T) or channels-last (B, C, T) memory, i.e. strides (T C, 1, C), which is
// what the vocoder's channels-last convolutions produce
at::Tensor snake(const at::Tensor& x, const at::Tensor& alpha) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3, "snake: x must be a (B, C, T) "
              "float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2);
  check_vec(alpha, C, "alpha", "snake");
  const bool rows_c = x.stride(1) == 1 && x.stride(2) == C && x.stride(0) == C * T;  // channels-last memory
  TORCH_CHECK(rows_c || x.is_contiguous(), "snake: x must be contiguous or channels-last (strides (T C, 1, C)), got "
              "strides ", x.strides());
  at::Tensor y = at::empty_strided(x.sizes(), x.strides(), x.options());
  const float* a = alpha.data_ptr<float>();
  std::vector<float> inv(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) inv[c] = 1.f / (a[c] + 1e-9f);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (rows_c) {
    at::parallel_for(0, B * T, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) ew::snake_row_vector_alpha(xp + r * C, a, inv.data(), yp + r * C, C);
    });
  } else {
    at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) ew::snake_row_scalar_alpha(xp + r * T, a[r % C], inv[r % C], yp + r * T, T);
    });
  }
  return y;
}

const char* isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

// ---- read-bandwidth probe (benchmarks): the sum of x, each thread reading its share as `streams` interleaved
// sequential streams (one 64-byte line of each in turn). On the 2-core VM one stream per thread reads at ~20-22 GB/s
// (as ATen's sum), 4-8 at ~28-31 GB/s: the bandwidth the decode kernels can reach, hence their floor.
at::Tensor read_probe(const at::Tensor& x, int64_t streams) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 1,
              "read_probe: x must be a contiguous 1-D float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(streams >= 1 && streams <= 16, "read_probe: streams must be in [1, 16], got ", streams);
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel(), nt = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> part(static_cast<size_t>(nt), 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t beg = n * t / nt, end = n * (t + 1) / nt;
      const int64_t seg = (end - beg) / streams / 16 * 16;  // floats per stream, whole lines
      double sum = 0.0;
      int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
      Isa::V acc[4] = {Isa::zero(), Isa::zero(), Isa::zero(), Isa::zero()};
      for (; i < seg; i += 16)
        for (int64_t s = 0; s < streams; ++s)
          for (int64_t j = 0; j < 16; j += Isa::L)
            acc[s & 3] = Isa::add(acc[s & 3], Isa::load(p + beg + s * seg + i + j));
      for (auto& a : acc) sum += Isa::reduce_add(a);
#endif
      for (int64_t s = 0; s < streams; ++s)
        for (int64_t k = beg + s * seg + i; k < beg + (s + 1) * seg; ++k) sum += p[k];
      for (int64_t k = beg + streams * seg; k < end; ++k) sum += p[k];
      part[static_cast<size_t>(t)] = sum;
    }
  });
  double total = 0.0;
  for (double v : part) total += v;
  return at::scalar_tensor(total, x.options().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY(chatterbox_fast, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int8_linear_packed(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor w) -> Tensor");
  m.def("bf16_linear_packed(Tensor x, Tensor w) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor input_pos, float scale) -> Tensor");
  m.def("full_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("full_attention_int8(Tensor q, Tensor k, Tensor v, float scale, bool force_portable=False) -> Tensor");
  m.def("full_attention_bf16(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_weight_int8(Tensor w, bool bf16_scales) -> (Tensor, Tensor)");
  m.def("dequant_rows(Tensor acc, Tensor sx, Tensor sw, Tensor? bias) -> Tensor");
  m.def("dequant_rows_acc_(Tensor(a!) y, Tensor acc, Tensor sx, Tensor sw, Tensor? bias) -> ()");
  m.def("layer_norm_fused(Tensor(a!) x, Tensor? add, Tensor weight, Tensor bias, float eps, bool mish) -> Tensor");
  m.def("bias_gelu_(Tensor(a!) y, Tensor bias) -> ()");
  m.def("snake(Tensor x, Tensor alpha) -> Tensor");
  m.def("copy_kv_slots(Tensor[] src_k, Tensor[] src_v, Tensor(a!)[] dst_k, Tensor(b!)[] dst_v, "
        "Tensor(c!)[] dst_scales, int start, int stop) -> ()");
  m.def("read_probe(Tensor x, int streams) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] weights, Tensor[] scales, Tensor[] norms, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, Tensor(c!)[] kv_scales, Tensor rope, Tensor input_pos, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatterbox_fast, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("read_probe", &read_probe);
  m.impl("int8_linear_packed", &int8_linear_packed);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("f32_linear", &f32_linear);
  m.impl("bf16_linear_packed", &bf16_linear_packed);
  m.impl("decode_attention", &decode_attention);
  m.impl("full_attention", &full_attention);
  m.impl("full_attention_int8", &full_attention_int8);
  m.impl("full_attention_bf16", &full_attention_bf16);
  m.impl("quantize_rows", &quantize_rows);
  m.impl("quantize_weight_int8", &quantize_weight_int8);
  m.impl("dequant_rows", &dequant_rows);
  m.impl("dequant_rows_acc_", &dequant_rows_acc_);
  m.impl("decode_layers", &decode_layers);
  m.impl("layer_norm_fused", &layer_norm_fused);
  m.impl("bias_gelu_", &bias_gelu_);
  m.impl("snake", &snake);
  m.impl("copy_kv_slots", &copy_kv_slots);
}

// The ISA this build targets (for logs and tests): the exported C symbol cbf_cpu_linear_isa.
extern "C" const char* cbf_cpu_linear_isa() { return isa(); }
extern "C" int cbf_attention_int8_fast() { return attention_int8_fast() ? 1 : 0; }
extern "C" int cbf_attention_bf16_amx() { return attention_bf16_amx() ? 1 : 0; }
// Which multiply the packed int8 linear runs: 2 = vpdpwssd (VNNI), 1 = vpmaddwd + vpaddd, 0 = the fp32-math kernel
extern "C" int cbf_int8_linear_path() {
#if defined(CBF_HAVE_I16_LINEAR)
  return dec::cpu_has_vnni() ? 2 : 1;
#else
  return 0;
#endif
}

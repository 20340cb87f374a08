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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NB = 8;  // output channels per block (8 x 2 accumulators; measured best of 2/4/8/12/16 here)

struct Int8Weight {
  using T = int8_t;
#if defined(__AVX512F__)
  static inline __m512 load16(const T* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
#elif defined(__AVX2__)
  static inline __m256 load8(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#endif
  static inline float load1(const T* p) { return static_cast<float>(*p); }
};

struct Bf16Weight {  // bf16 bits are the top half of an fp32: widen = shift left by 16
  using T = uint16_t;
#if defined(__AVX512F__)
  static inline __m512 load16(const T* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
#elif defined(__AVX2__)
  static inline __m256 load8(const T* p) {
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

// s0[j] = sum_k x0[k] * w[j * K + k], s1[j] likewise with x1, for j < B.
template <class W, int64_t B>
inline void dot_block(const float* x0, const float* x1, const typename W::T* w, int64_t K, float* s0, float* s1) {
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 a0[B], a1[B];
  for (int64_t j = 0; j < B; ++j) a0[j] = a1[j] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m512 v0 = _mm512_loadu_ps(x0 + k), v1 = _mm512_loadu_ps(x1 + k);
    for (int64_t j = 0; j < B; ++j) {
      const __m512 wv = W::load16(w + j * K + k);
      a0[j] = _mm512_fmadd_ps(v0, wv, a0[j]);
      a1[j] = _mm512_fmadd_ps(v1, wv, a1[j]);
    }
  }
  for (int64_t j = 0; j < B; ++j) {
    s0[j] = _mm512_reduce_add_ps(a0[j]);
    s1[j] = _mm512_reduce_add_ps(a1[j]);
  }
#elif defined(__AVX2__)
  __m256 a0[B], a1[B];
  for (int64_t j = 0; j < B; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k);
    for (int64_t j = 0; j < B; ++j) {
      const __m256 wv = W::load8(w + j * K + k);
      a0[j] = _mm256_fmadd_ps(v0, wv, a0[j]);
      a1[j] = _mm256_fmadd_ps(v1, wv, a1[j]);
    }
  }
  for (int64_t j = 0; j < B; ++j) {
    alignas(32) float t0[8], t1[8];
    _mm256_store_ps(t0, a0[j]);
    _mm256_store_ps(t1, a1[j]);
    s0[j] = s1[j] = 0.f;
    for (int i = 0; i < 8; ++i) {
      s0[j] += t0[i];
      s1[j] += t1[i];
    }
  }
#else
  for (int64_t j = 0; j < B; ++j) s0[j] = s1[j] = 0.f;
#endif
  for (; k < K; ++k) {  // tail (all of K without SIMD)
    for (int64_t j = 0; j < B; ++j) {
      const float wv = W::load1(w + j * K + k);
      s0[j] += x0[k] * wv;
      s1[j] += x1[k] * wv;
    }
  }
}

// y (M, N) = x (M, K) @ w (N, K)^T [* scale (N,)], fp32 accumulation.
template <class W>
void linear_kernel(const float* x, const typename W::T* w, const float* scale, float* y, int64_t M, int64_t N,
                   int64_t K) {
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

// ---- decode attention: one query per (batch, head) over the first n cache slots -------------------------------
// y (B, H, 1, D) = softmax(q k[:n]^T * scale) v[:n] with n = input_pos[0] + 1: T3's decode step, whose mask keeps
// the slots <= the query's position (no kv_len argument: an int argument would make torch.compile specialise the
// step on every cache bucket). Reads each of the n key and value rows once (the step's KV bytes),
// so it runs at memory speed; ATen's flash kernel with the bool mask reads the whole kv_len bucket and takes ~2x
// the bandwidth floor for a single query. Softmax in base 2 (q pre-scaled by scale * log2 e), fp32 throughout.
namespace dec {
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

// one (batch, head): q (D,) pre-scaled, k / v (n, D) rows contiguous, scores scratch (>= n + 16), out (D,)
void attend_one(const float* q, const float* k, const float* v, int64_t n, int64_t D, float* sc, float* out) {
#if defined(__AVX512F__)
  if (D == 64) {
    const __m512 q0 = _mm512_loadu_ps(q), q1 = _mm512_loadu_ps(q + 16), q2 = _mm512_loadu_ps(q + 32),
                 q3 = _mm512_loadu_ps(q + 48);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) {
      const float* kt = k + t * 64;
      __m512 a = _mm512_mul_ps(q0, _mm512_loadu_ps(kt));
      a = _mm512_fmadd_ps(q1, _mm512_loadu_ps(kt + 16), a);
      a = _mm512_fmadd_ps(q2, _mm512_loadu_ps(kt + 32), a);
      a = _mm512_fmadd_ps(q3, _mm512_loadu_ps(kt + 48), a);
      sc[t] = _mm512_reduce_add_ps(a);
      mx = std::max(mx, sc[t]);
    }
    const __m512 mv = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 mk = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(mk, exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sc + t), mv)));
      _mm512_mask_storeu_ps(sc + t, mk, e);
      sum = _mm512_add_ps(sum, e);
    }
    __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t t = 0; t < n; ++t) {
      const float* vt = v + t * 64;
      const __m512 p = _mm512_set1_ps(sc[t]);
      o0 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vt), o0);
      o1 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vt + 16), o1);
      o2 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vt + 32), o2);
      o3 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vt + 48), o3);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    _mm512_storeu_ps(out, _mm512_mul_ps(o0, inv));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(o1, inv));
    _mm512_storeu_ps(out + 32, _mm512_mul_ps(o2, inv));
    _mm512_storeu_ps(out + 48, _mm512_mul_ps(o3, inv));
    return;
  }
#endif
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    float a = 0.f;
    for (int64_t d = 0; d < D; ++d) a += q[d] * k[t * D + d];
    sc[t] = a;
    mx = std::max(mx, a);
  }
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += (sc[t] = std::exp2(sc[t] - mx));
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < D; ++d) out[d] += sc[t] * v[t * D + d];
  for (int64_t d = 0; d < D; ++d) out[d] /= sum;
}
}  // namespace dec

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& input_pos, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 4 && q.size(2) == 1,
              "decode_attention: q must be a (B, H, 1, D) float32 CPU tensor, got ", q.sizes(), " ", q.scalar_type());
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kFloat && c->dim() == 4 && c->is_contiguous() &&
                    c->size(0) == q.size(0) && c->size(1) == q.size(1) && c->size(3) == q.size(3),
                "decode_attention: the caches must be contiguous (B, H, max_seq, D) float32 CPU tensors matching q ",
                q.sizes(), ", got ", c->sizes());
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
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> sc(static_cast<size_t>(n + 16)), qv(static_cast<size_t>(D));
    for (int64_t g = g0; g < g1; ++g) {
      const float* qg = qp + (g / H) * q.stride(0) + (g % H) * q.stride(1);
      for (int64_t d = 0; d < D; ++d) qv[d] = qg[d] * qscale;
      dec::attend_one(qv.data(), kp + g * S * D, vp + g * S * D, n, D, sc.data(), yp + g * D);
    }
  });
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

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  check_common(x, w, at::kBFloat16, "bf16_linear");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  linear_kernel<Bf16Weight>(x.data_ptr<float>(), static_cast<const uint16_t*>(w.data_ptr()), nullptr,
                            y.data_ptr<float>(), M, N, K);
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

}  // namespace

TORCH_LIBRARY(chatterbox_fast, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor input_pos, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatterbox_fast, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("decode_attention", &decode_attention);
}

// The ISA this build targets (for logs and tests): the exported C symbol cbf_cpu_linear_isa.
extern "C" const char* cbf_cpu_linear_isa() { return isa(); }

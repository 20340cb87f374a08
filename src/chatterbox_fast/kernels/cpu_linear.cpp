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
#include <cstdint>
#include <cstring>

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
}

TORCH_LIBRARY_IMPL(chatterbox_fast, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("bf16_linear", &bf16_linear);
}

// The ISA this build targets (for logs and tests): the exported C symbol cbf_cpu_linear_isa.
extern "C" const char* cbf_cpu_linear_isa() { return isa(); }

// Shared by the fused CPU kernels of toolkit/model/kernels.py (one library, spectrolens_kernels):
// the instruction-set dispatch macros, exp / sigmoid that vectorise, argument checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace spectrolens {

// Inner loops of float rows are compiled for x86-64-v4 (AVX-512), v3 (AVX2) and baseline, picked at
// load time (GCC function multi-versioning); one build serves every node of a cluster.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SL_CLONES
#endif
// For the row templates that SL_CLONES wrappers call: inlined into each version even when large
// (a call would run one baseline-ISA copy from all three).
#if defined(__GNUC__)
#define SL_INLINE __attribute__((always_inline)) inline
#else
#define SL_INLINE inline
#endif

// exp on float with arithmetic only (Cephes polynomial, ~1 ulp), so the loops that call it vectorise.
SL_INLINE float exp_f(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

SL_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_f(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// t: `kernel`'s argument `name`, (rows, F) of `dtype` on the CPU with contiguous rows (any row stride).
inline void check_rows(const at::Tensor& t, const char* kernel, const char* name, int64_t rows, int64_t F,
                       at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), kernel, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == F, kernel, ": ", name, " must be (", rows, ", ",
              F, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, kernel, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.stride(1) == 1, kernel, ": ", name, " rows must be contiguous");
}

// t: a contiguous CPU vector of n values of `dtype`.
inline void check_vector(const at::Tensor& t, const char* kernel, const char* name, int64_t n,
                         at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == n &&
                  t.is_contiguous(),
              kernel, ": ", name, " must be a contiguous ", dtype, " CPU vector of length ", n);
}

}  // namespace spectrolens

// Fused LayerNorm -> SiLU -> residual add of ALIGNN's EdgeGatedGraphConv updates (and LayerNorm -> SiLU
// of its MLP layers), CPU (float32 and float64). For rows z = a + b (b optional) of F features,
// LayerNorm weight w and bias c:
//
//   mean = sum_f z_f / F,  rstd = 1 / sqrt(sum_f (z_f - mean)^2 / F + eps)      (nn.LayerNorm's)
//   xhat = (z - mean) * rstd,  t = xhat * w + c
//   out  = residual + t * sigmoid(t)                                            (residual optional)
//
// Forward: one pass over the rows (read a, b, residual; write out and the per-row mean and rstd),
// where torch ops make about ten (add, layer_norm, silu, add_). Backward: one pass (read grad out,
// a, b; write grad z), recomputing xhat, t and the sigmoid from a, b and the per-row statistics
// instead of storing the LayerNorm and SiLU outputs. Per row, with gt = grad_out * silu'(t) and
// gx = gt * w:
//
//   grad z = rstd * (gx - mean_f(gx) - xhat * mean_f(gx * xhat)),  grad w = sum_rows gt * xhat,
//   grad c = sum_rows gt
//
// Row sums run in vector lanes (omp simd reductions: a fixed order for each ISA version); grad w and
// grad c are summed per block of kBlock rows (blocks fixed by the row count alone), then over the
// blocks in block order (double accumulation): the results do not depend on the thread count. The
// residual's gradient is grad out itself (kernels.py). Registered as torch.ops.spectrolens.
// ln_silu_forward / ln_silu_backward, in the same library as the gate kernel (TORCH_LIBRARY_FRAGMENT).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"

namespace {

using spectrolens::sigmoid;

constexpr int64_t kBlock = 64;  // rows per task, and per partial sum of grad w / grad c
constexpr const char* kName = "layer_norm_silu kernel";

// ---- row kernels: one row of F features -------------------------------------------------------

// z = a (+ b) (into zb when b is given); -> (mean, rstd); out = (res +) silu(xhat * w + c)
template <typename T>
SL_INLINE void fwd_row(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ res,
                       const T* __restrict__ w, const T* __restrict__ c, T eps, T* __restrict__ out,
                       T* __restrict__ zb, T* mean_out, T* rstd_out, int64_t F) {
  T sum = T(0);
  if (b) {
#pragma omp simd reduction(+ : sum)
    for (int64_t f = 0; f < F; ++f) {
      zb[f] = a[f] + b[f];
      sum += zb[f];
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t f = 0; f < F; ++f) sum += a[f];
  }
  const T* __restrict__ z = b ? zb : a;
  const T mean = sum / T(F);
  T sq = T(0);
#pragma omp simd reduction(+ : sq)
  for (int64_t f = 0; f < F; ++f) {
    const T d = z[f] - mean;
    sq += d * d;
  }
  const T rstd = T(1) / std::sqrt(sq / T(F) + eps);
  if (res) {
    for (int64_t f = 0; f < F; ++f) {
      const T t = (z[f] - mean) * rstd * w[f] + c[f];
      out[f] = res[f] + t * sigmoid(t);
    }
  } else {
    for (int64_t f = 0; f < F; ++f) {
      const T t = (z[f] - mean) * rstd * w[f] + c[f];
      out[f] = t * sigmoid(t);
    }
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

// grad z of one row into gz; adds the row's terms of grad w / grad c to gw / gc. zb, gx: F scratch.
template <typename T>
SL_INLINE void bwd_row(const T* __restrict__ go, const T* __restrict__ a, const T* __restrict__ b,
                       const T* __restrict__ w, const T* __restrict__ c, T mean, T rstd, T* __restrict__ gz,
                       T* __restrict__ gw, T* __restrict__ gc, T* __restrict__ zb, T* __restrict__ gx, int64_t F) {
  if (b) {
    for (int64_t f = 0; f < F; ++f) zb[f] = a[f] + b[f];
  }
  const T* __restrict__ z = b ? zb : a;
  T s1 = T(0), s2 = T(0);
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t f = 0; f < F; ++f) {
    const T x = (z[f] - mean) * rstd;
    const T t = x * w[f] + c[f];
    const T s = sigmoid(t);
    const T gt = go[f] * (s * (T(1) + t * (T(1) - s)));  // d silu(t) / dt = s (1 + t (1 - s))
    const T g = gt * w[f];
    gw[f] += gt * x;
    gc[f] += gt;
    gx[f] = g;
    s1 += g;
    s2 += g * x;
  }
  const T m1 = s1 / T(F), m2 = s2 / T(F);
  for (int64_t f = 0; f < F; ++f) gz[f] = rstd * ((gx[f] - m1) - (z[f] - mean) * rstd * m2);
}

// The dispatched row kernels: float in three instruction-set versions (SL_CLONES), double plain.
SL_CLONES void fwd_row_v(const float* a, const float* b, const float* res, const float* w, const float* c,
                         float eps, float* out, float* zb, float* mean, float* rstd, int64_t F) {
  fwd_row<float>(a, b, res, w, c, eps, out, zb, mean, rstd, F);
}
inline void fwd_row_v(const double* a, const double* b, const double* res, const double* w, const double* c,
                      double eps, double* out, double* zb, double* mean, double* rstd, int64_t F) {
  fwd_row<double>(a, b, res, w, c, eps, out, zb, mean, rstd, F);
}
SL_CLONES void bwd_row_v(const float* go, const float* a, const float* b, const float* w, const float* c,
                         float mean, float rstd, float* gz, float* gw, float* gc, float* zb, float* gx, int64_t F) {
  bwd_row<float>(go, a, b, w, c, mean, rstd, gz, gw, gc, zb, gx, F);
}
inline void bwd_row_v(const double* go, const double* a, const double* b, const double* w, const double* c,
                      double mean, double rstd, double* gz, double* gw, double* gc, double* zb, double* gx,
                      int64_t F) {
  bwd_row<double>(go, a, b, w, c, mean, rstd, gz, gw, gc, zb, gx, F);
}

void check_common(const at::Tensor& a, const std::optional<at::Tensor>& b, const at::Tensor& weight,
                  const at::Tensor& bias) {
  const auto dtype = a.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, kName, ": float32 or float64 only, got ", dtype);
  TORCH_CHECK(a.dim() == 2 && a.size(1) > 0, kName, ": a must be (rows, F > 0), got ", a.sizes());
  const int64_t R = a.size(0), F = a.size(1);
  spectrolens::check_rows(a, kName, "a", R, F, dtype);
  if (b.has_value() && b->defined()) spectrolens::check_rows(*b, kName, "b", R, F, dtype);
  spectrolens::check_vector(weight, kName, "weight", F, dtype);
  spectrolens::check_vector(bias, kName, "bias", F, dtype);
}

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// ---- ops --------------------------------------------------------------------------------------

// -> (out (R, F), mean (R,), rstd (R,))
std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_silu_forward(const at::Tensor& a,
                                                                const std::optional<at::Tensor>& b,
                                                                const std::optional<at::Tensor>& residual,
                                                                const at::Tensor& weight, const at::Tensor& bias,
                                                                double eps) {
  check_common(a, b, weight, bias);
  const int64_t R = a.size(0), F = a.size(1);
  const at::Tensor *pb = opt(b), *pr = opt(residual);
  if (pr) spectrolens::check_rows(*pr, kName, "residual", R, F, a.scalar_type());
  auto out = at::empty({R, F}, a.options());
  auto mean = at::empty({R}, a.options());
  auto rstd = at::empty({R}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ln_silu_forward", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pbb = pb ? pb->data_ptr<scalar_t>() : nullptr;
    const scalar_t* prr = pr ? pr->data_ptr<scalar_t>() : nullptr;
    const int64_t sa = a.stride(0), sb = pb ? pb->stride(0) : 0, sr = pr ? pr->stride(0) : 0;
    const scalar_t *pw = weight.data_ptr<scalar_t>(), *pc = bias.data_ptr<scalar_t>();
    scalar_t *po = out.data_ptr<scalar_t>(), *pm = mean.data_ptr<scalar_t>(), *ps = rstd.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, R, kBlock, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> zb(F);
      for (int64_t r = begin; r < end; ++r) {
        fwd_row_v(pa + r * sa, pbb ? pbb + r * sb : nullptr, prr ? prr + r * sr : nullptr, pw, pc, e, po + r * F,
                  zb.data(), pm + r, ps + r, F);
      }
    });
  });
  return {out, mean, rstd};
}

// -> (grad z (R, F): the gradient of a and of b, grad weight (F,), grad bias (F,))
std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_silu_backward(const at::Tensor& grad_out, const at::Tensor& a,
                                                                 const std::optional<at::Tensor>& b,
                                                                 const at::Tensor& weight, const at::Tensor& bias,
                                                                 const at::Tensor& mean, const at::Tensor& rstd) {
  check_common(a, b, weight, bias);
  const int64_t R = a.size(0), F = a.size(1);
  const auto dtype = a.scalar_type();
  spectrolens::check_rows(grad_out, kName, "grad_out", R, F, dtype);
  spectrolens::check_vector(mean, kName, "mean", R, dtype);
  spectrolens::check_vector(rstd, kName, "rstd", R, dtype);
  const at::Tensor* pb = opt(b);
  const int64_t blocks = (R + kBlock - 1) / kBlock;
  auto gz = at::empty({R, F}, a.options());
  auto partial = at::zeros({blocks, 2 * F}, a.options());  // per block: grad w terms, then grad c terms
  auto gw = at::empty({F}, a.options());
  auto gc = at::empty({F}, a.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "ln_silu_backward", [&] {
    const scalar_t *pg = grad_out.data_ptr<scalar_t>(), *pa = a.data_ptr<scalar_t>();
    const scalar_t* pbb = pb ? pb->data_ptr<scalar_t>() : nullptr;
    const int64_t sg = grad_out.stride(0), sa = a.stride(0), sb = pb ? pb->stride(0) : 0;
    const scalar_t *pw = weight.data_ptr<scalar_t>(), *pc = bias.data_ptr<scalar_t>(),
                   *pm = mean.data_ptr<scalar_t>(), *ps = rstd.data_ptr<scalar_t>();
    scalar_t *pgz = gz.data_ptr<scalar_t>(), *pp = partial.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> zb(F), gx(F);
      for (int64_t k = begin; k < end; ++k) {
        scalar_t *pgw = pp + k * 2 * F, *pgc = pgw + F;
        for (int64_t r = k * kBlock; r < std::min(R, (k + 1) * kBlock); ++r) {
          bwd_row_v(pg + r * sg, pa + r * sa, pbb ? pbb + r * sb : nullptr, pw, pc, pm[r], ps[r], pgz + r * F, pgw,
                    pgc, zb.data(), gx.data(), F);
        }
      }
    });
    // the blocks' partial sums, in block order (double accumulation)
    scalar_t *pgw = gw.data_ptr<scalar_t>(), *pgc = gc.data_ptr<scalar_t>();
    at::parallel_for(0, 2 * F, 64, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(end - begin, 0.0);
      for (int64_t k = 0; k < blocks; ++k) {
        const scalar_t* row = pp + k * 2 * F;
        for (int64_t j = begin; j < end; ++j) acc[j - begin] += static_cast<double>(row[j]);
      }
      for (int64_t j = begin; j < end; ++j) (j < F ? pgw[j] : pgc[j - F]) = static_cast<scalar_t>(acc[j - begin]);
    });
  });
  return {gz, gw, gc};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spectrolens, lib) {
  lib.def("ln_silu_forward(Tensor a, Tensor? b, Tensor? residual, Tensor weight, Tensor bias, float eps) "
          "-> (Tensor, Tensor, Tensor)");
  lib.def("ln_silu_backward(Tensor grad_out, Tensor a, Tensor? b, Tensor weight, Tensor bias, Tensor mean, "
          "Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spectrolens, CPU, lib) {
  lib.impl("ln_silu_forward", &ln_silu_forward);
  lib.impl("ln_silu_backward", &ln_silu_backward);
}

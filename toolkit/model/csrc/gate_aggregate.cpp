// Fused edge-gated aggregation of ALIGNN's EdgeGatedGraphConv, CPU (float32 and float64).
//
// For edges k = (u -> v), sorted by destination v (CSR: in_ptr), with the edge pre-activation
// mm_k = W_eg y_k and the node projections es = W_sg x + b (edge-gate bias folded in),
// ed = W_dg x + b, bh = W_du x + b:
//
//   m_k  = mm_k + es_u + ed_v                      (returned: the LayerNorm input of the edge update)
//   s_k  = sigmoid(m_k)
//   den_v = sum_k s_k,  h_v = sum_k s_k * bh_u / (den_v + 1e-6)
//
// One pass over the edges instead of three gathers, two adds, a sigmoid, a product and two
// scatter-sums, each a full (E, F) pass through memory. The backward pass recomputes s from m and
// makes two passes: by destination (CSR in_ptr) for grad m / grad ed, and by source (edge order
// out_perm, CSR out_ptr) for grad es / grad bh, so every output row has exactly one writer: no
// atomics, no per-thread buffers, and sums in a fixed order whatever the thread count.
// Registered as torch.ops.spectrolens.gate_forward / gate_backward (toolkit/model/kernels.py); exp,
// sigmoid and the ISA dispatch (SL_CLONES) are in common.h.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using spectrolens::sigmoid;

constexpr double kEps = 1e-6;  // upstream's value, added to the gate sum

// ---- row kernels: one edge row of F features ------------------------------------------------

template <typename T>
inline void fwd_row(const T* __restrict__ mm, const T* __restrict__ es, const T* __restrict__ ed,
                    const T* __restrict__ bh, T* __restrict__ m, T* __restrict__ num,
                    T* __restrict__ den, int64_t F) {
  for (int64_t f = 0; f < F; ++f) {
    const T x = (mm[f] + es[f]) + ed[f];
    m[f] = x;
    const T s = sigmoid(x);
    num[f] += bh[f] * s;
    den[f] += s;
  }
}

template <typename T>
inline void bwd_dst_row(const T* __restrict__ gm, const T* __restrict__ m, const T* __restrict__ bh,
                        const T* __restrict__ gn, const T* __restrict__ gnh, T* __restrict__ out,
                        T* __restrict__ ged, int64_t F) {
  for (int64_t f = 0; f < F; ++f) {
    const T s = sigmoid(m[f]);
    const T g = (gm ? gm[f] : T(0)) + (gn[f] * bh[f] - gnh[f]) * s * (T(1) - s);
    out[f] = g;
    ged[f] += g;
  }
}

template <typename T>
inline void bwd_src_row(const T* __restrict__ gmm, const T* __restrict__ m, const T* __restrict__ gn,
                        T* __restrict__ ges, T* __restrict__ gbh, int64_t F) {
  for (int64_t f = 0; f < F; ++f) {
    ges[f] += gmm[f];
    gbh[f] += gn[f] * sigmoid(m[f]);
  }
}

// The dispatched row kernels: float in three instruction-set versions (SL_CLONES), double plain.
SL_CLONES void fwd_row_v(const float* mm, const float* es, const float* ed, const float* bh, float* m,
                         float* num, float* den, int64_t F) {
  fwd_row<float>(mm, es, ed, bh, m, num, den, F);
}
inline void fwd_row_v(const double* mm, const double* es, const double* ed, const double* bh, double* m,
                      double* num, double* den, int64_t F) {
  fwd_row<double>(mm, es, ed, bh, m, num, den, F);
}
SL_CLONES void bwd_dst_row_v(const float* gm, const float* m, const float* bh, const float* gn,
                             const float* gnh, float* out, float* ged, int64_t F) {
  bwd_dst_row<float>(gm, m, bh, gn, gnh, out, ged, F);
}
inline void bwd_dst_row_v(const double* gm, const double* m, const double* bh, const double* gn,
                          const double* gnh, double* out, double* ged, int64_t F) {
  bwd_dst_row<double>(gm, m, bh, gn, gnh, out, ged, F);
}
SL_CLONES void bwd_src_row_v(const float* gmm, const float* m, const float* gn, float* ges, float* gbh,
                             int64_t F) {
  bwd_src_row<float>(gmm, m, gn, ges, gbh, F);
}
inline void bwd_src_row_v(const double* gmm, const double* m, const double* gn, double* ges, double* gbh,
                          int64_t F) {
  bwd_src_row<double>(gmm, m, gn, ges, gbh, F);
}

// ---- checks ---------------------------------------------------------------------------------

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t F, at::ScalarType dtype) {
  spectrolens::check_rows(t, "gate kernel", name, rows, F, dtype);
}

void check_index(const at::Tensor& t, const char* name, int64_t n) {
  spectrolens::check_vector(t, "gate kernel", name, n, at::kLong);
}

constexpr int64_t kGrain = 16;  // destination / source rows per task

// ---- ops ------------------------------------------------------------------------------------

// -> (m (E, F), h (N, F), den (N, F))
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_forward(const at::Tensor& mm, const at::Tensor& es,
                                                             const at::Tensor& ed, const at::Tensor& bh,
                                                             const at::Tensor& src, const at::Tensor& in_ptr) {
  const int64_t E = mm.size(0), F = mm.size(1), N = es.size(0);
  const auto dtype = mm.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "gate kernel: float32 or float64 only, got ", dtype);
  check_rows(mm, "mm", E, F, dtype);
  check_rows(es, "es", N, F, dtype);
  check_rows(ed, "ed", N, F, dtype);
  check_rows(bh, "bh", N, F, dtype);
  check_index(src, "src", E);
  check_index(in_ptr, "in_ptr", N + 1);
  auto m = at::empty({E, F}, mm.options());
  auto h = at::empty({N, F}, mm.options());
  auto den = at::empty({N, F}, mm.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "gate_forward", [&] {
    const scalar_t *pmm = mm.data_ptr<scalar_t>(), *pes = es.data_ptr<scalar_t>(),
                   *ped = ed.data_ptr<scalar_t>(), *pbh = bh.data_ptr<scalar_t>();
    const int64_t smm = mm.stride(0), ses = es.stride(0), sed = ed.stride(0), sbh = bh.stride(0);
    const int64_t *psrc = src.data_ptr<int64_t>(), *pptr = in_ptr.data_ptr<int64_t>();
    scalar_t *pm = m.data_ptr<scalar_t>(), *ph = h.data_ptr<scalar_t>(), *pden = den.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> num(F);
      for (int64_t v = begin; v < end; ++v) {
        scalar_t* d = pden + v * F;
        std::fill(num.begin(), num.end(), scalar_t(0));
        std::fill(d, d + F, scalar_t(0));
        for (int64_t k = pptr[v]; k < pptr[v + 1]; ++k) {
          const int64_t u = psrc[k];
          fwd_row_v(pmm + k * smm, pes + u * ses, ped + v * sed, pbh + u * sbh, pm + k * F, num.data(), d, F);
        }
        scalar_t* hv = ph + v * F;
        for (int64_t f = 0; f < F; ++f) hv[f] = num[f] / (d[f] + scalar_t(kEps));
      }
    });
  });
  return {m, h, den};
}

// -> (grad mm (E, F), grad es (N, F), grad ed (N, F), grad bh (N, F))
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward(
    const std::optional<at::Tensor>& grad_m, const at::Tensor& grad_h, const at::Tensor& m, const at::Tensor& h,
    const at::Tensor& den, const at::Tensor& bh, const at::Tensor& src, const at::Tensor& dst,
    const at::Tensor& in_ptr, const at::Tensor& out_perm, const at::Tensor& out_ptr) {
  const int64_t E = m.size(0), F = m.size(1), N = h.size(0);
  const auto dtype = m.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "gate kernel: float32 or float64 only, got ", dtype);
  check_rows(m, "m", E, F, dtype);
  check_rows(h, "h", N, F, dtype);
  check_rows(den, "den", N, F, dtype);
  check_rows(bh, "bh", N, F, dtype);
  check_rows(grad_h, "grad_h", N, F, dtype);
  const bool has_gm = grad_m.has_value() && grad_m->defined();
  if (has_gm) check_rows(*grad_m, "grad_m", E, F, dtype);
  check_index(src, "src", E);
  check_index(dst, "dst", E);
  check_index(in_ptr, "in_ptr", N + 1);
  check_index(out_perm, "out_perm", E);
  check_index(out_ptr, "out_ptr", N + 1);
  auto gmm = at::empty({E, F}, m.options());
  auto ges = at::empty({N, F}, m.options());
  auto ged = at::empty({N, F}, m.options());
  auto gbh = at::empty({N, F}, m.options());
  auto gn = at::empty({N, F}, m.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "gate_backward", [&] {
    const scalar_t *pm = m.data_ptr<scalar_t>(), *ph = h.data_ptr<scalar_t>(), *pden = den.data_ptr<scalar_t>(),
                   *pbh = bh.data_ptr<scalar_t>(), *pgh = grad_h.data_ptr<scalar_t>();
    const scalar_t* pgm = has_gm ? grad_m->data_ptr<scalar_t>() : nullptr;
    const int64_t sbh = bh.stride(0), sgh = grad_h.stride(0), sgm = has_gm ? grad_m->stride(0) : 0;
    const int64_t *psrc = src.data_ptr<int64_t>(), *pdst = dst.data_ptr<int64_t>(),
                  *pin = in_ptr.data_ptr<int64_t>(), *pperm = out_perm.data_ptr<int64_t>(),
                  *pout = out_ptr.data_ptr<int64_t>();
    scalar_t *pgmm = gmm.data_ptr<scalar_t>(), *pges = ges.data_ptr<scalar_t>(), *pged = ged.data_ptr<scalar_t>(),
             *pgbh = gbh.data_ptr<scalar_t>(), *pgn = gn.data_ptr<scalar_t>();
    // pass 1, by destination: gn = grad_h / (den + eps); grad m; grad ed
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> gnh(F);
      for (int64_t v = begin; v < end; ++v) {
        scalar_t *gnv = pgn + v * F, *gedv = pged + v * F;
        const scalar_t *ghv = pgh + v * sgh, *hv = ph + v * F, *dv = pden + v * F;
        for (int64_t f = 0; f < F; ++f) {
          gnv[f] = ghv[f] / (dv[f] + scalar_t(kEps));
          gnh[f] = gnv[f] * hv[f];
          gedv[f] = scalar_t(0);
        }
        for (int64_t k = pin[v]; k < pin[v + 1]; ++k) {
          bwd_dst_row_v(has_gm ? pgm + k * sgm : nullptr, pm + k * F, pbh + psrc[k] * sbh, gnv, gnh.data(),
                          pgmm + k * F, gedv, F);
        }
      }
    });
    // pass 2, by source: grad es = sum of grad m; grad bh = sum of gn[v] * s
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        scalar_t *gesu = pges + u * F, *gbhu = pgbh + u * F;
        std::fill(gesu, gesu + F, scalar_t(0));
        std::fill(gbhu, gbhu + F, scalar_t(0));
        for (int64_t j = pout[u]; j < pout[u + 1]; ++j) {
          const int64_t k = pperm[j];
          bwd_src_row_v(pgmm + k * F, pm + k * F, pgn + pdst[k] * F, gesu, gbhu, F);
        }
      }
    });
  });
  return {gmm, ges, ged, gbh};
}

}  // namespace

TORCH_LIBRARY(spectrolens, lib) {
  lib.def("gate_forward(Tensor mm, Tensor es, Tensor ed, Tensor bh, Tensor src, Tensor in_ptr) -> (Tensor, Tensor, Tensor)");
  lib.def("gate_backward(Tensor? grad_m, Tensor grad_h, Tensor m, Tensor h, Tensor den, Tensor bh, Tensor src, "
          "Tensor dst, Tensor in_ptr, Tensor out_perm, Tensor out_ptr) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spectrolens, CPU, lib) {
  lib.impl("gate_forward", &gate_forward);
  lib.impl("gate_backward", &gate_backward);
}

// LayerNorm / RMSNorm on the CPU: fused forward and backward for CPU tensors (fasttfm._C).
//
// Same contract as the CUDA launchers in launchers.h (x, dy rows with a stride, unit column stride;
// weight/bias nullable, in the input's dtype or fp32; fp32 mean/rstd saved). Statistics and the
// row reductions of the backward accumulate in double; rows run in parallel with OpenMP.
// Parameter gradients: rows are split into a fixed number of parts (independent of the thread
// count), each part sums its rows in order, then the parts are summed in order: the result is
// bitwise the same for any number of threads.
#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace ftfm {
namespace {

using cpu::to_float;

// sum over c of f(c), accumulated in float lanes within blocks of kBlock columns (vectorizes) and
// in double across blocks (accurate for rows of any length).
constexpr int kLanes = 16;
constexpr int64_t kBlock = 512;

template <typename F>
inline double row_sum(int64_t cols, F&& f) {
  double total = 0.0;
  for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
    const int64_t c1 = c0 + kBlock < cols ? c0 + kBlock : cols;
    float lanes[kLanes] = {};
    int64_t c = c0;
    for (; c + kLanes <= c1; c += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += f(c + l);
    }
    double block = 0.0;
    for (; c < c1; ++c) block += f(c);
    for (int l = 0; l < kLanes; ++l) block += lanes[l];
    total += block;
  }
  return total;
}

template <typename T, typename W>
void norm_fwd(const T* x, int64_t xs, const W* w, const W* b, T* y, float* mean_out, float* rstd_out, int64_t rows,
              int64_t cols, float eps, bool rms) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * xs;
    T* yr = y + r * cols;
    const float m = rms ? 0.f : static_cast<float>(row_sum(cols, [&](int64_t c) { return to_float(xr[c]); }) /
                                                  static_cast<double>(cols));
    const double ss = row_sum(cols, [&](int64_t c) {  // sum of squares of (x - mean)
      const float d = to_float(xr[c]) - m;
      return d * d;
    });
    const float rstd = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(cols) + static_cast<double>(eps)));
    if (w && b) {
      for (int64_t c = 0; c < cols; ++c) yr[c] = cpu::from_float<T>((to_float(xr[c]) - m) * rstd * to_float(w[c]) + to_float(b[c]));
    } else if (w) {
      for (int64_t c = 0; c < cols; ++c) yr[c] = cpu::from_float<T>((to_float(xr[c]) - m) * rstd * to_float(w[c]));
    } else {
      for (int64_t c = 0; c < cols; ++c) {
        const float v = (to_float(xr[c]) - m) * rstd;
        yr[c] = cpu::from_float<T>(b ? v + to_float(b[c]) : v);
      }
    }
    if (mean_out) mean_out[r] = m;
    rstd_out[r] = rstd;
  }
}

int64_t cpu_parts(int64_t rows) { return rows < 16 ? rows : 16; }

template <typename T, typename W>
void norm_bwd(const T* dy, int64_t dys, const T* x, int64_t xs, const W* w, const float* mean, const float* rstd, T* dx,
              W* dw, W* db, int64_t rows, int64_t cols, bool rms) {
  const int64_t parts = cpu_parts(rows);
  const bool need_params = dw || db;
  std::vector<double> acc(need_params ? static_cast<size_t>(2 * parts * cols) : 0, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < parts; ++p) {
    double* pdw = need_params ? acc.data() + p * cols : nullptr;
    double* pdb = need_params ? acc.data() + (parts + p) * cols : nullptr;
    const int64_t r0 = rows * p / parts, r1 = rows * (p + 1) / parts;
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * xs;
      const T* dyr = dy + r * dys;
      T* dxr = dx + r * cols;
      const float m = rms ? 0.f : mean[r];
      const float rs = rstd[r];
      auto g_at = [&](int64_t c) { return w ? to_float(dyr[c]) * to_float(w[c]) : to_float(dyr[c]); };
      // sum(g) and sum(g * xhat), g = dy * w
      const double sum_g = rms ? 0.0 : row_sum(cols, g_at);
      const double sum_gx = row_sum(cols, [&](int64_t c) { return g_at(c) * ((to_float(xr[c]) - m) * rs); });
      if (pdw) {
        for (int64_t c = 0; c < cols; ++c) pdw[c] += static_cast<double>(to_float(dyr[c]) * ((to_float(xr[c]) - m) * rs));
      }
      if (pdb) {
        for (int64_t c = 0; c < cols; ++c) pdb[c] += to_float(dyr[c]);
      }
      const float a = static_cast<float>(sum_gx / static_cast<double>(cols));
      const float c0 = rms ? 0.f : static_cast<float>(sum_g / static_cast<double>(cols));
      for (int64_t c = 0; c < cols; ++c) {
        const float xhat = (to_float(xr[c]) - m) * rs;
        const float d = to_float(dyr[c]);
        const float g = w ? d * to_float(w[c]) : d;
        dxr[c] = cpu::from_float<T>(rs * (g - c0 - xhat * a));
      }
    }
  }
  if (!need_params) return;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < cols; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t p = 0; p < parts; ++p) {
      sw += acc[p * cols + c];
      sb += acc[(parts + p) * cols + c];
    }
    if (dw) dw[c] = cpu::from_float<W>(static_cast<float>(sw));
    if (db) db[c] = cpu::from_float<W>(static_cast<float>(sb));
  }
}

// T: the data type; W: T or float.
template <typename F>
void dispatch_tw(DType xd, DType wd, F&& f) {
  cpu::dispatch(xd, [&](auto t) {
    using T = decltype(t);
    if (wd == DType::F32) {
      f(T{}, float{});
    } else {
      f(T{}, T{});
    }
  });
}

}  // namespace

void layer_norm_fwd_cpu(const void* x, int64_t x_row_stride, const void* weight, const void* bias, void* y, float* mean,
                        float* rstd, int64_t rows, int64_t cols, float eps, bool rms, DType x_dtype, DType w_dtype) {
  dispatch_tw(x_dtype, w_dtype, [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    norm_fwd<T, W>(static_cast<const T*>(x), x_row_stride, static_cast<const W*>(weight), static_cast<const W*>(bias),
                   static_cast<T*>(y), mean, rstd, rows, cols, eps, rms);
  });
}

void layer_norm_bwd_cpu(const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride, const void* weight,
                        const float* mean, const float* rstd, void* dx, void* dweight, void* dbias, int64_t rows,
                        int64_t cols, bool rms, DType x_dtype, DType w_dtype) {
  dispatch_tw(x_dtype, w_dtype, [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    norm_bwd<T, W>(static_cast<const T*>(dy), dy_row_stride, static_cast<const T*>(x), x_row_stride,
                   static_cast<const W*>(weight), mean, rstd, static_cast<T*>(dx), static_cast<W*>(dweight),
                   static_cast<W*>(dbias), rows, cols, rms);
  });
}

}  // namespace ftfm

// Cross-entropy on the CPU: fused forward and backward for CPU tensors (fasttfm._C).
//
// Same contract and loss as the CUDA launchers (launchers.h, cross-entropy section): logits rows with
// a stride and contiguous classes, int64 targets, optional fp32 class weights, per-row fp32 loss and
// LSE saved; the backward recomputes softmax from the LSE and writes the gradient (possibly in place).
// A target outside [0, cols) that is not ignore_index gets NaN like on the GPU, and the first such row
// is returned (else -1) so that bindings.cpp raises a clear IndexError after the loop.
//
// Speed. Rows run in parallel (OpenMP). A row is walked once in blocks of kBlock classes: each block is
// widened to floats (16-bit types; fp32 is read in place), its max and sum of logits taken, then sum
// exp(x - max) with the running sum rescaled once per block (the block is L1-resident for that second
// sweep). The float loops are branch-free with our own polynomial exp (exp_lane) and `omp simd`
// reductions, so g++ -O3 vectorizes them without -ffast-math; on x86-64 they are compiled twice
// (AVX2+FMA and the baseline ISA) and picked at load time (target_clones), so no -march is needed and
// the binary runs anywhere. Nothing of size rows x cols is allocated besides the gradient itself.
// Softcapping (cap > 0) widens every block through cap * tanh(x / cap) (std::tanh, not vectorized: the
// capped path is slower) and multiplies the gradient by 1 - tanh^2.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_common.h"

namespace ftfm {
namespace {

using cpu::to_float;

constexpr int64_t kBlock = 1024;  // classes per block (4 KiB of floats)
constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) in float, branch-free, for x <= 88 (every caller passes x - max or x - lse, i.e. <= ~0):
// x clamped below at -88 with a bit mask (a `?:` clamp stays a branch under the default
// -ftrapping-math and blocks vectorization), n = round(x / ln 2) by the 1.5 * 2^23 shifter,
// r = x - n ln 2 (two-constant Cody-Waite, |r| <= 0.347), exp(r) by a degree-5 polynomial fitted for
// relative error (< 7.5e-8 exact; < 2.2e-7 measured in float), times 2^n built in the exponent bits.
// Results below 2^-126 become 0 (exp(-87.4) and less: nothing a softmax keeps). NaN stays NaN.
inline float exp_lane(float x) {
  const int32_t lo = -static_cast<int32_t>(x < -88.0f);
  x = std::bit_cast<float>((std::bit_cast<int32_t>(x) & ~lo) | (std::bit_cast<int32_t>(-88.0f) & lo));
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const int32_t n = std::bit_cast<int32_t>(t) - 0x4B400000;
  const float nf = t - shifter;
  const float r = (x - nf * 0.693145751953125f) - nf * 1.42860682030941723212e-6f;
  float p = 0.008297654800117016f;
  p = p * r + 0.04191538318991661f;
  p = p * r + 0.16667574644088745f;
  p = p * r + 0.49998894333839417f;
  p = p * r + 0.9999997019767761f;
  p = p * r + 1.0000001192092896f;
  return p * std::bit_cast<float>((n + 127) << 23);
}

// ---- float block kernels (the hot loops). Each call covers one block of <= kBlock classes, so the
// load-time dispatch between the clones (FTFM_CPU_CLONES, cpu_common.h) costs nothing.

// max of f[0..n) and sum of f (times w when w is not null). NaNs are dropped by the max, kept by the sum.
FTFM_CPU_CLONES void block_max_sum(const float* f, const float* w, int64_t n, float* max_out, double* sum_out) {
  float bm = -kInf, bs = 0.f;
  if (w) {
#pragma omp simd reduction(max : bm) reduction(+ : bs)
    for (int64_t i = 0; i < n; ++i) {
      bm = f[i] > bm ? f[i] : bm;
      bs += f[i] * w[i];
    }
  } else {
#pragma omp simd reduction(max : bm) reduction(+ : bs)
    for (int64_t i = 0; i < n; ++i) {
      bm = f[i] > bm ? f[i] : bm;
      bs += f[i];
    }
  }
  *max_out = bm;
  *sum_out = bs;
}

// sum of exp(f - m) over the block.
FTFM_CPU_CLONES double block_sum_exp(const float* f, int64_t n, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_lane(f[i] - m);
  return s;
}

// out = coef * exp(f - lse) - bg * w (w = 1 when null). out may be f itself (in place).
FTFM_CPU_CLONES void block_grad(const float* f, const float* w, int64_t n, float lse, float coef, float bg,
                                float* out) {
  if (w) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = coef * exp_lane(f[i] - lse) - bg * w[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = coef * exp_lane(f[i] - lse) - bg;
  }
}

// A block of n (<= kBlock) classes as floats: `buf` is filled for 16-bit types; fp32 is read in place.
template <typename T>
inline const float* widen(const T* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    (void)n;
    (void)buf;
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = to_float(x[i]);
    return buf;
  }
}

// A block as the loss sees it: the plain widened logits, or cap * tanh(x / cap) in `buf` (cap > 0).
template <typename T>
inline const float* widen_capped(const T* x, int64_t n, float* buf, float cap) {
  if (cap == 0.f) return widen(x, n, buf);
  const float inv = 1.f / cap;
  for (int64_t i = 0; i < n; ++i) buf[i] = cap * std::tanh(to_float(x[i]) * inv);
  return buf;
}

inline float capped(float x, float cap) { return cap == 0.f ? x : cap * std::tanh(x * (1.f / cap)); }

// One row: lse and sum_c w_c y_c (w nullable; y the capped logits), in one pass over memory.
template <typename T>
inline void row_lse(const T* xr, int64_t cols, const float* w, float cap, double* lse_out, double* sx_out) {
  alignas(64) float buf[kBlock];
  double s = 0.0, sx = 0.0;
  float m = -kInf;
  for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - c0);
    const float* f = widen_capped(xr + c0, n, buf, cap);
    float bm;
    double bs;
    block_max_sum(f, w ? w + c0 : nullptr, n, &bm, &bs);
    sx += bs;
    const float mn = bm > m ? bm : m;
    if (mn == -kInf) continue;  // nothing finite yet: s stays 0
    s = s * std::exp(static_cast<double>(m) - static_cast<double>(mn)) + block_sum_exp(f, n, mn);
    m = mn;
  }
  *lse_out = static_cast<double>(m) + std::log(s);
  *sx_out = sx;
}

template <typename T>
int64_t ce_fwd(const T* x, int64_t xs, const int64_t* target, const float* w, const float* wsum, float* loss,
               float* lse, int64_t rows, int64_t cols, int64_t ignore, float a, float b, float z, float cap) {
  const double W = w ? static_cast<double>(*wsum) : static_cast<double>(cols);
  int64_t bad = std::numeric_limits<int64_t>::max();
#pragma omp parallel for schedule(static) reduction(min : bad)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = target[r];
    if (t == ignore) {  // not read
      loss[r] = lse[r] = 0.f;
      continue;
    }
    if (t < 0 || t >= cols) {
      bad = std::min(bad, r);
      loss[r] = lse[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const T* xr = x + r * xs;
    double l, sx;
    row_lse(xr, cols, w, cap, &l, &sx);
    const double wt = w ? w[t] : 1.0;
    double out = a * wt * (l - capped(to_float(xr[t]), cap));
    if (b != 0.f) out += b * (W * l - sx);
    if (z != 0.f) out += z * l * l;
    if (std::isnan(sx)) out = l = std::numeric_limits<double>::quiet_NaN();
    loss[r] = static_cast<float>(out);
    lse[r] = static_cast<float>(l);
  }
  return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

template <typename T>
int64_t ce_bwd(const float* dloss, int64_t ds, const T* x, int64_t xs, const int64_t* target, const float* w,
               const float* wsum, const float* lse, T* dx, int64_t dxs, int64_t rows, int64_t cols, int64_t ignore,
               float a, float b, float z, float cap) {
  const float W = w ? *wsum : static_cast<float>(cols);
  int64_t bad = std::numeric_limits<int64_t>::max();
  // A fresh dx is first touched here with ordinary 4 KiB pages: see cpu_common.h on huge pages.
#pragma omp parallel for schedule(static) reduction(min : bad)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = target[r];
    T* dr = dx + r * dxs;
    if (t == ignore || t < 0 || t >= cols) {  // ignored: zeros (not read); bad target: NaN
      if (t != ignore) bad = std::min(bad, r);
      const T fill = cpu::from_float<T>(t == ignore ? 0.f : std::numeric_limits<float>::quiet_NaN());
      for (int64_t c = 0; c < cols; ++c) dr[c] = fill;
      continue;
    }
    const T* xr = x + r * xs;
    const float g = dloss[r * ds], l = lse[r], wt = w ? w[t] : 1.f;
    const float coef = g * (a * wt + b * W + 2.f * z * l), bg = g * b, tg = g * a * wt;
    alignas(64) float buf[kBlock], out[kBlock];
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t n = std::min(kBlock, cols - c0);
      // fp32 uncapped: f may alias dr (in place); each c is read before written
      const float* f = widen_capped(xr + c0, n, buf, cap);
      float* o = std::is_same_v<T, float> ? reinterpret_cast<float*>(dr + c0) : out;
      block_grad(f, w ? w + c0 : nullptr, n, l, coef, bg, o);
      if (t >= c0 && t < c0 + n) o[t - c0] -= tg;
      if (cap != 0.f) {  // d(cap tanh(x / cap))/dx = 1 - (y / cap)^2; f is buf here, never dr
        const float inv = 1.f / cap;
        for (int64_t i = 0; i < n; ++i) o[i] *= 1.f - (f[i] * inv) * (f[i] * inv);
      }
      if constexpr (!std::is_same_v<T, float>)
        for (int64_t i = 0; i < n; ++i) dr[c0 + i] = cpu::from_float<T>(out[i]);
    }
  }
  return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

}  // namespace

int64_t cross_entropy_fwd_cpu(const void* logits, int64_t row_stride, const int64_t* target, const float* weight,
                              const float* weight_sum, float* loss, float* lse, int64_t rows, int64_t cols,
                              int64_t ignore_index, float a, float b, float z, float softcap, DType dtype) {
  int64_t bad = -1;
  cpu::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    bad = ce_fwd<T>(static_cast<const T*>(logits), row_stride, target, weight, weight_sum, loss, lse, rows, cols,
                    ignore_index, a, b, z, softcap);
  });
  return bad;
}

int64_t cross_entropy_bwd_cpu(const float* dloss, int64_t dloss_stride, const void* logits, int64_t row_stride,
                              const int64_t* target, const float* weight, const float* weight_sum, const float* lse,
                              void* dlogits, int64_t dlogits_stride, int64_t rows, int64_t cols,
                              int64_t ignore_index, float a, float b, float z, float softcap, DType dtype) {
  int64_t bad = -1;
  cpu::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    bad = ce_bwd<T>(dloss, dloss_stride, static_cast<const T*>(logits), row_stride, target, weight, weight_sum, lse,
                    static_cast<T*>(dlogits), dlogits_stride, rows, cols, ignore_index, a, b, z, softcap);
  });
  return bad;
}

}  // namespace ftfm

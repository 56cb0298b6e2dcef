// Scaled / masked / causal softmax over rows on the CPU (fasttfm._C), for CPU tensors.
//
// Same contract as the CUDA launcher (launchers.h, SoftmaxFwdArgs) for the row case inner == 1:
// z = x * scale (+ additive mask), -inf where a bool mask is false or a key is causally hidden
// (bottom-right aligned), y = exp(z - max) / sum; zero_empty rows with no visible key -> 0, else NaN.
// fp32 math. Rows run in parallel (OpenMP); each row is converted into a float buffer once, then
// max, exp-and-sum and the scaled store are simple loops the compiler vectorizes: the exp is a
// branch-free Cody-Waite reduction with a degree-6 polynomial (about 1 ulp on (-87, 0]), which
// is what lets this beat composing torch ops with the same semantics (fp32 math, empty rows -> 0):
// 1.7-3x on the 2-core dev machines (bench/bench_softmax.py; the fp16 loads/stores are the slow part).
#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cpu_common.h"

namespace ftfm {
namespace {

using cpu::to_float;

// exp(x) for x <= 0 (softmax arguments z - max): 0 below -87, NaN stays NaN. Vectorizable.
inline float exp_nonpos(float x) {
  const float t = std::max(x, -87.f);
  const float n = (t * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(t / ln 2), |.| < 2^22
  const float r = (t - n * 0.693359375f) - n * -2.12194440e-4f;           // t - n ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const float scale = std::bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  const float e = x < -87.f ? 0.f : p * scale;
  return x != x ? x : e;
}

// Branch-free fp16 conversions (the loops over a row vectorize with them; cpu_common.h's are branchy).
// Widening: shift the bits into float position and rescale by 2^112, exact for normals and
// subnormals; inf/nan get the all-ones exponent. Narrowing: round to nearest even, with subnormals,
// overflow to inf and nan kept, each case computed and selected.
inline float load_f(float v) { return v; }
inline float load_f(cpu::BFloat16 v) { return to_float(v); }
inline float load_f(cpu::Half v) {
  const uint32_t em = v.bits & 0x7fffu, sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t fin = std::bit_cast<uint32_t>(std::bit_cast<float>(em << 13) * 0x1p112f);
  const uint32_t special = 0x7f800000u | ((em & 0x3ffu) << 13);
  return std::bit_cast<float>((em >= 0x7c00u ? special : fin) | sign);
}
template <typename T>
inline T store_f(float f) { return cpu::from_float<T>(f); }
template <>
inline cpu::Half store_f<cpu::Half>(float f) {
  const uint32_t u0 = std::bit_cast<uint32_t>(f), sign = (u0 >> 16) & 0x8000u, u = u0 & 0x7fffffffu;
  const float magic = std::bit_cast<float>(126u << 23);  // 0.5: adding it rounds |f| < 2^-14 to a multiple of 2^-24
  const uint32_t sub = std::bit_cast<uint32_t>(std::bit_cast<float>(u) + magic) - std::bit_cast<uint32_t>(magic);
  const uint32_t nrm = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;  // nan, or inf for |f| >= 65520
  const uint32_t h = u >= (143u << 23) ? big : (u < (113u << 23) ? sub : nrm);
  return cpu::Half{static_cast<uint16_t>(h | sign)};
}

struct RowMaskView {
  const void* ptr;
  bool is_bool;
  int64_t moff, sk;
};

// Logits of one row into z[0, cols): columns >= vis are -inf.
template <typename T>
void row_logits(const T* xr, float* z, int64_t cols, int64_t vis, float scale, const RowMaskView& m) {
#pragma omp simd
  for (int64_t c = 0; c < vis; ++c) z[c] = load_f(xr[c]) * scale;
  for (int64_t c = vis; c < cols; ++c) z[c] = -std::numeric_limits<float>::infinity();
  if (!m.ptr) return;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (m.is_bool) {
    const uint8_t* mb = static_cast<const uint8_t*>(m.ptr) + m.moff;
    if (m.sk == 1) {
#pragma omp simd
      for (int64_t c = 0; c < vis; ++c) z[c] = mb[c] ? z[c] : kNegInf;
    } else {
      for (int64_t c = 0; c < vis; ++c) z[c] = mb[c * m.sk] ? z[c] : kNegInf;
    }
  } else {
    const T* ma = static_cast<const T*>(m.ptr) + m.moff;
    if (m.sk == 1) {
#pragma omp simd
      for (int64_t c = 0; c < vis; ++c) z[c] += load_f(ma[c]);
    } else {
      for (int64_t c = 0; c < vis; ++c) z[c] += load_f(ma[c * m.sk]);
    }
  }
}

// The float hot loops, also compiled for AVX2 + FMA and picked at run time on x86-64 (the default
// build targets baseline x86-64, i.e. 4-wide SSE2; aten's own CPU kernels dispatch the same way).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FTFM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FTFM_CPU_CLONES
#endif

FTFM_CPU_CLONES float row_max(const float* z, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) mx = z[c] > mx ? z[c] : mx;  // skips NaN; exp(NaN - mx) brings it back
  return mx;
}

// z <- exp(z - mx); returns the sum: float vector lanes within blocks of 128 columns, double across
// blocks (adding many small terms to a lane that already holds ~1 would lose ~1e-6 relative).
FTFM_CPU_CLONES double row_exp_sum(float* z, int64_t n, float mx) {
  double total = 0.0;
  for (int64_t c0 = 0; c0 < n; c0 += 128) {
    const int64_t c1 = std::min<int64_t>(n, c0 + 128);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = c0; c < c1; ++c) {
      z[c] = exp_nonpos(z[c] - mx);
      s += z[c];
    }
    total += s;
  }
  return total;
}

template <typename T, typename TO>
void rows_fwd(const SoftmaxFwdArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  TO* y = static_cast<TO*>(a.y);
  const int64_t rows = a.outer, cols = a.C, nq = a.nq;
  const SoftmaxMask& mk = a.mask;
#pragma omp parallel
  {
    std::vector<float> buf(static_cast<size_t>(cols));
    float* z = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t q = r % nq, t = r / nq;
      const int64_t vis = a.causal ? std::clamp<int64_t>(q + 1 + cols - nq, 0, cols) : cols;
      const RowMaskView m{mk.ptr, mk.is_bool, mk.ptr ? (t / mk.d1) * mk.s0 + (t % mk.d1) * mk.s1 + q * mk.sq : 0,
                          mk.sk};
      row_logits(x + r * a.x_s0, z, cols, vis, a.scale, m);
      TO* yr = y + r * cols;
      const float mx = row_max(z, cols);
      if (mx == -std::numeric_limits<float>::infinity()) {  // no visible key: zeros, or torch's NaN
        const TO fill = cpu::from_float<TO>(a.zero_empty ? 0.f : std::numeric_limits<float>::quiet_NaN());
        std::fill(yr, yr + cols, fill);
        continue;
      }
      const float inv = static_cast<float>(1.0 / row_exp_sum(z, cols, mx));
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) yr[c] = store_f<TO>(z[c] * inv);
    }
  }
}

}  // namespace

void softmax_fwd_cpu(const SoftmaxFwdArgs& a) {
  if (a.inner != 1) throw std::invalid_argument("fasttfm: softmax_fwd_cpu handles the last axis only (inner == 1)");
  if (a.outer <= 0 || a.C <= 0) return;
  if (a.nq < 1 || a.outer % a.nq != 0) throw std::invalid_argument("fasttfm: softmax_fwd_cpu: rows must be a multiple of nq");
  cpu::dispatch(a.x_dtype, [&](auto t) {
    using T = decltype(t);
    if (a.y_dtype == DType::F32) {
      rows_fwd<T, float>(a);
    } else if (a.y_dtype == a.x_dtype) {
      rows_fwd<T, T>(a);
    } else {
      throw std::invalid_argument("fasttfm: softmax_fwd_cpu: output dtype must be the input's or float32");
    }
  });
}

}  // namespace ftfm

// Scaled / masked / causal softmax over rows on the CPU (fasttfm._C), for CPU tensors.
//
// Same contract as the CUDA launcher (launchers.h, SoftmaxFwdArgs) for the row case inner == 1:
// z = x * scale (+ additive mask), -inf where a bool mask is false or a key is causally hidden
// (bottom-right aligned), y = exp(z - max) / sum; zero_empty rows with no visible key -> 0, else NaN.
// fp32 math. Rows run in parallel (OpenMP); each row is converted into a float buffer once, then
// max, exp-and-sum and the scaled store run over that buffer; the exp is a Cody-Waite reduction with a
// degree-6 polynomial (about 1 ulp on (-86, 0]), 8-wide with AVX2 + FMA when the CPU has them.
// Measured on the 2-core dev machine (4M scores, pad mask + causal + scale): 8.0 ms fp32 / 6.9 ms bf16
// vs 22.6 / 16.0 ms for torch ops composed in the input dtype; fp16 on par (its conversions are the
// slow part). Plain rows tie aten's softmax for fp32/bf16, so the op layer keeps aten there.
#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cpu_common.h"

namespace ftfm {
namespace {

using cpu::has_avx2;
using cpu::to_float;

// Not shared with cross_entropy_cpu.cpp's exp_lane: another clamp (-86 here keeps products normal) and
// polynomial, each measured in its own loop; folding them would change one kernel's results in the last bits.
// exp(x) for x <= 0 (softmax arguments z - max), branch-free so the loops vectorize: x < -86 gives 0
// (exp(-86) = 4e-38, nothing next to a row sum >= 1; clamping there also keeps every product normal,
// as subnormal results cost microcode assists on x86), and NaN stays NaN (NaN * 0 is NaN).
inline float exp_nonpos(float x) {
  const float t = std::max(x, -86.f);
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
  return p * scale * static_cast<float>(x >= -86.f);
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

// The float hot loops. Besides the default build (baseline x86-64: 4-wide SSE2) they are compiled
// for AVX2 + FMA and picked at run time on x86-64 CPUs that have them, as aten's kernels are.
inline float row_max_body(const float* z, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) mx = z[c] > mx ? z[c] : mx;  // skips NaN; exp(NaN - mx) brings it back
  return mx;
}
// z <- exp(z - mx); returns the sum: 8 float lanes within blocks of 128 columns, double across blocks
// (adding many small terms to a lane that already holds ~1 would lose ~1e-6 relative). Explicit lanes,
// not an `omp simd reduction`, whose privatized sum kept GCC from vectorizing the loop.
inline double row_exp_sum_body(float* z, int64_t n, float mx) {
  double total = 0.0;
  int64_t c = 0;
  for (; c + 128 <= n; c += 128) {
    float lanes[8] = {};
    for (int64_t b = c; b < c + 128; b += 8)
      for (int j = 0; j < 8; ++j) {
        const float e = exp_nonpos(z[b + j] - mx);
        z[b + j] = e;
        lanes[j] += e;
      }
    total += ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
  float tail = 0.f;
  for (; c < n; ++c) {
    z[c] = exp_nonpos(z[c] - mx);
    tail += z[c];
  }
  return total + tail;
}

#ifdef FTFM_X86_AVX2
// AVX2 + FMA versions, picked at run time (the default build targets baseline x86-64). The exp loop is
// written with intrinsics: GCC keeps the compare-selects of exp_nonpos as branches under its default
// -ftrapping-math and then does not vectorize the loop (measured ~10x slower).
FTFM_AVX2_FMA float row_max_avx2(const float* z, int64_t n) { return row_max_body(z, n); }
FTFM_AVX2_FMA double row_exp_sum_avx2(float* z, int64_t n, float mx) {
  const __m256 vmx = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-86.f), one = _mm256_set1_ps(1.f);
  double total = 0.0;
  int64_t c = 0;
  for (; c + 128 <= n; c += 128) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = c; b < c + 128; b += 8) {
      const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(z + b), vmx);
      const __m256 t = _mm256_max_ps(lo, x);  // the second operand when either is NaN: NaN stays
      const __m256 nf = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), t);
      r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
      __m256 p = _mm256_set1_ps(1.9875691500e-4f);
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
      p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
      const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
      const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_NLT_UQ);  // x >= -86 or NaN
      const __m256 v = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
      _mm256_storeu_ps(z + b, v);
      acc = _mm256_add_ps(acc, v);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    total += ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
  float tail = 0.f;
  for (; c < n; ++c) {
    z[c] = exp_nonpos(z[c] - mx);
    tail += z[c];
  }
  return total + tail;
}
#else
float row_max_avx2(const float* z, int64_t n) { return row_max_body(z, n); }
double row_exp_sum_avx2(float* z, int64_t n, float mx) { return row_exp_sum_body(z, n, mx); }
#endif
float row_max(const float* z, int64_t n) { return has_avx2() ? row_max_avx2(z, n) : row_max_body(z, n); }
double row_exp_sum(float* z, int64_t n, float mx) {
  return has_avx2() ? row_exp_sum_avx2(z, n, mx) : row_exp_sum_body(z, n, mx);
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

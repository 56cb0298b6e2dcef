// Shared helpers for the CPU C++ kernels (csrc/cpu/*.cpp): element types, conversions, parallel loops.
// No torch and no CUDA headers: the CPU kernels build in a CPU-only fasttfm._C too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../include/launchers.h"

// ---- x86-64 instruction sets, chosen at run time (the build uses no -march, so _C runs on any x86-64) ----
// FTFM_CPU_CLONES: g++ compiles the function twice, for x86-64-v3 (AVX2 + FMA) and the baseline, and the
// loader picks one (target_clones). Loops g++ will not vectorize on its own (softmax's exp: its compare-
// selects stay branches under -ftrapping-math) get an intrinsics version marked FTFM_AVX2_FMA, defined
// when FTFM_X86_AVX2 is, and called when cpu::has_avx2().
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FTFM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FTFM_CPU_CLONES
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FTFM_X86_AVX2 1
#define FTFM_AVX2_FMA __attribute__((target("avx2,fma")))
#endif

namespace ftfm {
namespace cpu {

#ifdef FTFM_X86_AVX2
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
inline bool has_avx2() { return false; }
#endif

// Storage-only 16-bit float types: the kernels compute in float (or double) and convert at load/store.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// fp16 -> float, branch-free (selects only, so the loops that call it vectorize): normal halves
// move their exponent/mantissa into float position and rebias the exponent by +112 (inf/nan by
// +224, to the all-ones exponent); subnormal halves are mantissa * 2^-24, computed exactly from an
// integer (no subnormal float arithmetic, so it holds under flush-to-zero too). Exact for all 65536
// inputs (tests/test_cpu_convert.py checks every one, and from_float<Half> against a reference).
inline float to_float(Half x) {
  const uint32_t bits = x.bits, e = bits & 0x7c00u, em = (bits & 0x7fffu) << 13;
  const uint32_t normal = em + ((112u << 23) << static_cast<uint32_t>(e == 0x7c00u));  // +112, or +224
  const float sub = static_cast<float>(static_cast<int32_t>(bits & 0x3ffu)) * 0x1p-24f;
  uint32_t sub_bits;
  std::memcpy(&sub_bits, &sub, 4);
  const uint32_t is_sub = 0u - static_cast<uint32_t>(e == 0);  // all ones for subnormals and zeros
  const uint32_t u = ((sub_bits & is_sub) | (normal & ~is_sub)) | ((bits & 0x8000u) << 16);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// No transparent-huge-page hint (MADV_HUGEPAGE) for fresh outputs (issue 16 item 12): it once made the
// first touch of the 1 GiB cross-entropy gradient (8192 x 32000 fp32) cheaper, but on a machine in use
// the huge-page faults cost 0.3 to 2.7 s from run to run (fill of a fresh 1 GiB buffer here: median
// 1.34 s, max 2.70 s with the hint; 0.58 s and 0.73 s with 4 KiB pages), so the backward swung between
// 0.3 and 2.4 s. Ordinary pages: a steady cost, paid in parallel by the threads that write the rows.

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline BFloat16 from_float<BFloat16>(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}
// float -> fp16, round to nearest even, branch-free: the normal range rounds in the integer domain
// (add 0xfff plus the lowest kept bit, shift); below 2^-14 the FPU rounds (|f| + 0.5 leaves the
// half-subnormal mantissa in the low bits); >= 65520 becomes inf, nan stays (quiet) nan.
template <>
inline Half from_float<Half>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, absu = u & 0x7fffffffu;
  const uint32_t normal = (absu - (112u << 23) + 0xfffu + ((absu >> 13) & 1u)) >> 13;
  float a, t;
  std::memcpy(&a, &absu, 4);
  t = a + 0.5f;
  uint32_t tb;
  std::memcpy(&tb, &t, 4);
  const uint32_t sub = tb - 0x3f000000u;
  const uint32_t is_sub = 0u - static_cast<uint32_t>(absu < 0x38800000u);  // masks, not branches
  const uint32_t is_inf = 0u - static_cast<uint32_t>(absu >= 0x477ff000u);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(absu > 0x7f800000u);
  uint32_t h = (sub & is_sub) | (normal & ~is_sub);
  h = (0x7c00u & is_inf) | (h & ~is_inf);
  h = (0x7e00u & is_nan) | (h & ~is_nan);
  return Half{static_cast<uint16_t>(sign | h)};
}

// f(T{}) for the storage type of `d` (float, Half, BFloat16).
template <typename F>
void dispatch(DType d, F&& f) {
  switch (d) {
    case DType::F32: f(float{}); return;
    case DType::F16: f(Half{}); return;
    case DType::BF16: f(BFloat16{}); return;
  }
}

}  // namespace cpu
}  // namespace ftfm

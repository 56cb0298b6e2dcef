// Shared helpers for the CPU C++ kernels (csrc/cpu/*.cpp): element types, conversions, parallel loops.
// No torch and no CUDA headers: the CPU kernels build in a CPU-only fasttfm._C too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../include/launchers.h"

namespace ftfm {
namespace cpu {

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
inline float to_float(Half x) {
  const uint32_t sign = (x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1f, mant = x.bits & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    u = sign;  // +-0
  } else {     // subnormal half -> normal float
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A hint for a large output buffer that was just allocated and is about to be written once: back it
// with transparent huge pages (Linux, THP in "madvise" or "always" mode) so that the first touch
// takes one fault and one clear per 2 MiB instead of per 4 KiB page. For the 1 GiB cross-entropy
// gradient (8192 x 32000 fp32) that first touch, not the arithmetic, was most of the backward.
// Only whole 2 MiB pages inside [p, p + bytes) are advised; a refused hint changes nothing.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 8 * kHuge) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

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
template <>
inline Half from_float<Half>(float f) {  // round to nearest even, with subnormals, inf and nan
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};
  if (absu >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (absu < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (absu < 0x33000000u) return Half{sign};  // < 2^-25 rounds to 0
    const uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(absu >> 23);  // 14..24
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return Half{static_cast<uint16_t>(sign | h)};
  }
  uint32_t h = ((absu >> 13) - (112u << 10));
  const uint32_t rem = absu & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
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

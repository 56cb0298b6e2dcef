// Driver for tests/test_cpu_convert.py: the fp16 <-> float conversions of csrc/cpu/cpu_common.h.
//   convert_check halves      -> stdout: 65536 float bit patterns, to_float(Half{h}) for every h
//   convert_check floats      <- stdin: float32 values; -> stdout: from_float<Half>(x) bits (uint16)
//   convert_check exhaustive  -> stdout: number of float bit patterns (all 2^32) where from_float<Half>
//                                differs from a straightforward reference (branches, integer rounding)
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/cpu_common.h"

using ftfm::cpu::Half;

static uint16_t reference_from_float(float f) {  // round to nearest even, subnormals, inf, nan
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return sign | 0x7e00u;
  if (absu >= 0x477ff000u) return sign | 0x7c00u;
  if (absu < 0x38800000u) {
    if (absu < 0x33000000u) return sign;
    const uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(absu >> 23);
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (absu >> 13) - (112u << 10);
  const uint32_t rem = absu & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  if (!std::strcmp(argv[1], "halves")) {
    std::vector<uint32_t> out(65536);
    for (uint32_t h = 0; h < 65536; ++h) {
      const float f = ftfm::cpu::to_float(Half{static_cast<uint16_t>(h)});
      std::memcpy(&out[h], &f, 4);
    }
    return std::fwrite(out.data(), 4, out.size(), stdout) == out.size() ? 0 : 1;
  }
  if (!std::strcmp(argv[1], "floats")) {
    float f;
    while (std::fread(&f, 4, 1, stdin) == 1) {
      const uint16_t h = ftfm::cpu::from_float<Half>(f).bits;
      std::fwrite(&h, 2, 1, stdout);
    }
    return 0;
  }
  if (!std::strcmp(argv[1], "exhaustive")) {
    unsigned long long bad = 0;
    uint32_t u = 0;
    do {
      float f;
      std::memcpy(&f, &u, 4);
      bad += ftfm::cpu::from_float<Half>(f).bits != reference_from_float(f);
    } while (++u != 0);
    std::printf("%llu\n", bad);
    return 0;
  }
  return 2;
}

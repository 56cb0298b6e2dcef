// Aligned vector loads/stores and float conversions for fp32 / fp16 / bf16 device code.
//
// Memory-bound kernels move data in 16-byte accesses (LDG.128 / STG.128): 4 x fp32 or 8 x fp16/bf16
// per thread per instruction. `Vec<T, N>` is N contiguous elements aligned to min(16, N*sizeof(T))
// bytes; a Vec wider than 16 bytes (e.g. 8 x fp32 weights next to 8 x bf16 activations) is moved as
// several 16-byte accesses. The caller guarantees the alignment (see `aligned16` on the host side):
// a misaligned vector access is a fault on the GPU.
//
// Conversions go through fp32: `to_float(x)` widens exactly; `from_float<T>(f)` rounds to nearest
// even (as torch's casts do). All of this compiles both with nvcc and with g++ under the SIMT
// emulator (FASTTFM_EMU), where the toolkit's __half/__nv_bfloat16 do host arithmetic.
#pragma once
#include "ftfm_cuda.h"

namespace ftfm {

// Elements of T in one 16-byte access: 4 for fp32, 8 for fp16/bf16.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

// N contiguous elements of T. N must be a power of two so the alignment is one too.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Vec {
  static_assert(N > 0 && (N & (N - 1)) == 0, "Vec width must be a power of two");
  T v[N];
};

// ---- scalar conversions -------------------------------------------------------------------------
__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__host__ __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__host__ __device__ __forceinline__ T from_float(float x);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- vector access ------------------------------------------------------------------------------
// Load/store N elements at p; p must be aligned to alignof(Vec<T, N>).
template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// A Vec with every element equal to `x` (rounded to T).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> fill_vec(float x) {
  Vec<T, N> r;
  const T t = from_float<T>(x);
#pragma unroll
  for (int j = 0; j < N; ++j) r.v[j] = t;
  return r;
}

// N elements at p, or `fallback` in every lane when p is nullptr (optional weight/bias).
template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec_or(const T* p, int64_t offset, float fallback) {
  return p ? load_vec<N>(p + offset) : fill_vec<T, N>(fallback);
}

// ---- a thread's slice of a row ------------------------------------------------------------------
// ITERS vectors of VEC elements of one row (chunk), kept packed in T. With `tpr` threads sharing the
// row, thread `lane` holds vector i at column col0 + (i * tpr + lane) * VEC, so consecutive lanes touch
// consecutive 16-byte pieces (coalesced) and a thread holds ITERS * VEC elements. Columns >= limit are
// not read and hold zeros; with cols % VEC == 0 a vector is entirely in or out of range.
template <typename T, int VEC, int ITERS>
struct RowFrag {
  Vec<T, VEC> v[ITERS];
  __device__ __forceinline__ static int col(int i, int lane, int tpr, int col0) {
    return col0 + (i * tpr + lane) * VEC;
  }
  __device__ __forceinline__ void load(const T* row, int col0, int lane, int tpr, int limit) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = col(i, lane, tpr, col0);
      v[i] = c < limit ? load_vec<VEC>(row + c) : fill_vec<T, VEC>(0.f);
    }
  }
  __device__ __forceinline__ float f(int i, int j) const { return to_float(v[i].v[j]); }
};

// ---- host-side helpers --------------------------------------------------------------------------
// True when p may be used for 16-byte vector accesses (nullptr counts as aligned: nothing is read).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace ftfm

// Warp and block reductions for row kernels (LayerNorm/RMSNorm, softmax, cross-entropy).
//
// Values: float, `Sum2` (two sums reduced together, one round of shuffles and one barrier for both)
// and `MeanM2` (count, mean, sum of squared deviations, merged with Chan's parallel formula).
// Ops: `SumOp`, `MaxOp` and `ChanOp`, each with an identity.
//
// Results are bit-identical in every thread of a group and deterministic run to run: the
// butterfly (xor) pattern is fixed and every op is commutative bit for bit (a+b == b+a; ChanOp is
// written symmetrically), so each pair of lanes exchanging values computes the same result.
//
// Groups. `group_allreduce(v, width, smem, op)` reduces over groups of `width` consecutive threads
// (threadIdx.x only):
//   * width a power of two <= 32: shuffles only, no shared memory, no barrier. Every lane of the warp
//     must call it (full-mask shuffles), so keep idle threads in the call with the identity value;
//   * width a multiple of 32 that divides blockDim.x: shuffles, then one __syncthreads and a
//     second shuffle round over the group's per-warp results in `smem` (>= blockDim.x / 32 entries).
//     Every thread of the block must call it (uniform control flow).
// One barrier per call is enough only if two consecutive calls never use the same `smem`:
// `GroupReducer` alternates between two buffers to guarantee it. (A thread leaving call k+1
// has passed the barrier of call k+1, so every thread has finished reading call k's buffer
// before call k+2 writes it again.)
#pragma once
#include "ftfm_cuda.h"

#include <algorithm>
#include <cmath>

namespace ftfm {

// ---- value types --------------------------------------------------------------------------------
struct Sum2 {
  float a, b;
};
__device__ __forceinline__ Sum2 operator+(const Sum2& x, const Sum2& y) { return Sum2{x.a + y.a, x.b + y.b}; }

// Running statistics of n values: their mean and m2 = sum((x - mean)^2). Variance = m2 / n.
struct MeanM2 {
  float n, mean, m2;
};

// Chan et al. merge of two disjoint sets, written symmetrically so merge(a, b) == merge(b, a) bitwise:
//   n = na + nb,  mean = (na*ma + nb*mb) / n,  m2 = m2a + m2b + (mb - ma)^2 * na*nb / n.
// Exact counts in float up to 2^24 values per set. 1/n by __fdividef (<= 2 ulp, no slow-path call).
__device__ __forceinline__ MeanM2 chan_merge(const MeanM2& a, const MeanM2& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return MeanM2{0.f, 0.f, 0.f};
  const float inv = __fdividef(1.f, n);
  const float delta = b.mean - a.mean;
  // __fmul_rn keeps the compiler from contracting one product into an (asymmetric) fma
  const float mean = (__fmul_rn(a.n, a.mean) + __fmul_rn(b.n, b.mean)) * inv;
  return MeanM2{n, mean, (a.m2 + b.m2) + (delta * delta) * (a.n * b.n) * inv};
}

// ---- ops ----------------------------------------------------------------------------------------
struct SumOp {
  template <typename V>
  __device__ __forceinline__ V operator()(const V& x, const V& y) const { return x + y; }
  template <typename V>
  __device__ __forceinline__ static V identity() { return V{}; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float x, float y) const { return fmaxf(x, y); }
  template <typename V>
  __device__ __forceinline__ static V identity() { return -INFINITY; }
};
struct ChanOp {
  __device__ __forceinline__ MeanM2 operator()(const MeanM2& x, const MeanM2& y) const { return chan_merge(x, y); }
  template <typename V>
  __device__ __forceinline__ static V identity() { return MeanM2{0.f, 0.f, 0.f}; }
};

// ---- shuffles of the value types (full warp mask) --------------------------------------------------
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ Sum2 shfl_xor(const Sum2& v, int m) { return Sum2{shfl_xor(v.a, m), shfl_xor(v.b, m)}; }
__device__ __forceinline__ MeanM2 shfl_xor(const MeanM2& v, int m) {
  return MeanM2{shfl_xor(v.n, m), shfl_xor(v.mean, m), shfl_xor(v.m2, m)};
}

// ---- reductions -----------------------------------------------------------------------------------
// All-reduce over aligned groups of `width` lanes (power of two <= 32) of a fully active warp.
template <typename V, typename Op>
__device__ __forceinline__ V warp_allreduce(V v, Op op, int width = 32) {
  for (int m = width >> 1; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  return v;
}

// All-reduce over groups of `width` consecutive threads; see the header comment for the rules.
template <typename V, typename Op>
__device__ __forceinline__ V group_allreduce(V v, int width, V* smem, Op op) {
  v = warp_allreduce(v, op, width < 32 ? width : 32);
  if (width <= 32) return v;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int warps_per_group = width >> 5, first_warp = warp - warp % warps_per_group;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  V r = lane < warps_per_group ? smem[first_warp + lane] : Op::template identity<V>();
  return warp_allreduce(r, op, 32);
}

// All-reduce over the whole block (blockDim.x a multiple of 32, or <= 32 and a power of two).
template <typename V, typename Op>
__device__ __forceinline__ V block_allreduce(V v, V* smem, Op op) {
  return group_allreduce(v, static_cast<int>(blockDim.x), smem, op);
}

// Consecutive group all-reduces with one barrier each: alternates between two halves of `smem`
// (a __shared__ array of 2 * 32 values). Use one reducer per smem array, from uniform control flow.
template <typename V>
struct GroupReducer {
  V* smem;    // [2][32]
  int width;  // threads per group
  int flip;
  __device__ __forceinline__ GroupReducer(V* s, int w) : smem(s), width(w), flip(0) {}
  template <typename Op>
  __device__ __forceinline__ V allreduce(V v, Op op) {
    V* buf = smem + 32 * flip;
    flip ^= 1;
    return group_allreduce(v, width, buf, op);
  }
};

// ---- host side: launch shapes for group reductions -------------------------------------------------
// Group width (threads per row) so each thread holds at most `per_thread` of a row's `units` items:
// a power of two up to 32, else a multiple of 32 -- both valid for group_allreduce. The caller checks
// the result against its kernel's block-size limit (capped at 2^20 to stay an int).
inline int group_width(int64_t units, int per_thread) {
  const int64_t need = (units + per_thread - 1) / per_thread;
  if (need <= 32) {
    int t = 1;
    while (t < need) t <<= 1;
    return t;
  }
  return static_cast<int>(std::min<int64_t>((need + 31) / 32 * 32, int64_t(1) << 20));
}

// A 1-D grid of `blocks` blocks, capped at 2^30 (kernels loop grid-stride over the rest).
inline unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t(1) << 30));
}

}  // namespace ftfm

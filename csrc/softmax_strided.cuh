// Softmax over a non-last axis without a transpose copy (included by softmax.cu only, after softmax_fwd.cuh).
//
// x viewed as [outer, C, inner] (inner > 1, unit inner stride), softmax over C. A 256-thread block
// covers TX consecutive inner indices (tx, the fast thread index: warps read contiguous runs of
// the innermost axis) times TY = 256 / TX threads along C. TX = min(32, inner) rounded up to a power
// of two, widened while C is short so threads are not idle. C <= TY * 16 is held in registers
// (x read once); longer C uses an online (max, sum) pass and a second read of x.
#pragma once
#include "softmax_fwd.cuh"

namespace ftfm {
namespace softmax_impl {
namespace {

template <typename TI, typename TO>
struct StridedFwdParams {
  const TI* x; int64_t x_s0, x_s1; TO* y; int64_t outer, inner; int C; int tx; int64_t itiles; bool in_regs;
};
template <typename TY, typename TX>
struct StridedBwdParams {
  const TY* y; int64_t y_s0, y_s1; const TY* dy; int64_t dy_s0, dy_s1; TX* dx; int64_t outer, inner; int C;
  float scale; int tx; int64_t itiles; bool in_regs;
};

// All-reduce over the threads of a kStridedThreads block that share tx = threadIdx.x % txw (txw a power of
// two): butterfly shuffles inside each warp (lanes txw, 2*txw, ... apart), then one barrier and a pass
// over the per-warp (or per-ty) results in a fixed order, so every thread of a column gets the same bits.
// `smem` (kStridedThreads floats) must differ from the previous call's buffer (see StridedReducer).
template <typename Op>
__device__ __forceinline__ float column_allreduce(float v, int txw, float* smem, Op op) {
  for (int m = txw; m < 32; m <<= 1) v = op(v, shfl_xor(v, m));
  smem[threadIdx.x] = v;
  __syncthreads();
  const int step = txw < 32 ? 32 : txw, n = static_cast<int>(blockDim.x) / step;
  const int tx = static_cast<int>(threadIdx.x) % txw;
  float r = smem[tx];
  for (int k = 1; k < n; ++k) r = op(r, smem[k * step + tx]);
  return r;
}
struct StridedReducer {
  float* smem;  // [2][kStridedThreads]
  int txw, flip = 0;
  template <typename Op>
  __device__ __forceinline__ float allreduce(float v, Op op) {
    float* buf = smem + kStridedThreads * flip;
    flip ^= 1;
    return column_allreduce(v, txw, buf, op);
  }
};

template <typename TI, typename TO, int ITERS>
__global__ void __launch_bounds__(kStridedThreads) softmax_fwd_strided_kernel(StridedFwdParams<TI, TO> p) {
  __shared__ float red_smem[2 * kStridedThreads];
  const int txw = p.tx, tx = static_cast<int>(threadIdx.x) % txw, ty = static_cast<int>(threadIdx.x) / txw;
  const int tyn = static_cast<int>(blockDim.x) / txw;
  StridedReducer red{red_smem, txw};
  for (int64_t tile = blockIdx.x; tile < p.outer * p.itiles; tile += gridDim.x) {
    const int64_t o = tile / p.itiles, i = (tile % p.itiles) * txw + tx;
    const bool valid = i < p.inner;  // idle columns still join the reductions
    const TI* xc = p.x + o * p.x_s0 + (valid ? i : 0);
    TO* yc = p.y + o * p.C * p.inner + i;
    if (p.in_regs) {
      float v[ITERS];
      float m = -INFINITY;
#pragma unroll
      for (int k = 0; k < ITERS; ++k) {
        const int c = ty + k * tyn;
        v[k] = valid && c < p.C ? to_float(xc[c * p.x_s1]) : -INFINITY;
        m = fmaxf(m, v[k]);
      }
      m = red.allreduce(m, MaxOp());
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < ITERS; ++k) {
        v[k] = valid && ty + k * tyn < p.C ? __expf(v[k] - m) : 0.f;  // NaN for an all -inf column, as torch
        s += v[k];
      }
      const float inv = 1.f / red.allreduce(s, SumOp());
      if (!valid) continue;
#pragma unroll
      for (int k = 0; k < ITERS; ++k) {
        const int c = ty + k * tyn;
        if (c < p.C) yc[c * p.inner] = from_float<TO>(v[k] * inv);
      }
    } else {
      Online acc;
      for (int c0 = ty; c0 < p.C; c0 += kUnroll * tyn) {
        float v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = c0 + u * tyn;
          v[u] = valid && c < p.C ? to_float(xc[c * p.x_s1]) : -INFINITY;
        }
        acc.add(v);
      }
      const float M = red.allreduce(acc.m, MaxOp());
      const float inv = 1.f / red.allreduce(acc.sum_at(M), SumOp());
      if (!valid) continue;
      for (int c = ty; c < p.C; c += tyn) yc[c * p.inner] = from_float<TO>(__expf(to_float(xc[c * p.x_s1]) - M) * inv);
    }
  }
}

// Same tile layout prologue as the forward, kept in place (index math next to its loads, as everywhere here).
template <typename TY, typename TX, int ITERS>
__global__ void __launch_bounds__(kStridedThreads) softmax_bwd_strided_kernel(StridedBwdParams<TY, TX> p) {
  __shared__ float red_smem[2 * kStridedThreads];
  const int txw = p.tx, tx = static_cast<int>(threadIdx.x) % txw, ty = static_cast<int>(threadIdx.x) / txw;
  const int tyn = static_cast<int>(blockDim.x) / txw;
  StridedReducer red{red_smem, txw};
  for (int64_t tile = blockIdx.x; tile < p.outer * p.itiles; tile += gridDim.x) {
    const int64_t o = tile / p.itiles, i = (tile % p.itiles) * txw + tx;
    const bool valid = i < p.inner;
    const TY* yc = p.y + o * p.y_s0 + (valid ? i : 0);
    const TY* dc = p.dy + o * p.dy_s0 + (valid ? i : 0);
    TX* dxc = p.dx + o * p.C * p.inner + i;
    if (p.in_regs) {
      float yv[ITERS], dv[ITERS];
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < ITERS; ++k) {
        const int c = ty + k * tyn;
        const bool in = valid && c < p.C;
        yv[k] = in ? to_float(yc[c * p.y_s1]) : 0.f;
        dv[k] = in ? to_float(dc[c * p.dy_s1]) : 0.f;
        s += yv[k] * dv[k];
      }
      s = red.allreduce(s, SumOp());
      if (!valid) continue;
#pragma unroll
      for (int k = 0; k < ITERS; ++k) {
        const int c = ty + k * tyn;
        if (c < p.C) dxc[c * p.inner] = from_float<TX>(p.scale * yv[k] * (dv[k] - s));
      }
    } else {
      float s = 0.f;
      for (int c0 = ty; c0 < p.C; c0 += kUnroll * tyn) {
        float yv[kUnroll], dv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = c0 + u * tyn;
          const bool in = valid && c < p.C;
          yv[u] = in ? to_float(yc[c * p.y_s1]) : 0.f;
          dv[u] = in ? to_float(dc[c * p.dy_s1]) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) s += yv[u] * dv[u];
      }
      s = red.allreduce(s, SumOp());
      if (!valid) continue;
      for (int c = ty; c < p.C; c += tyn) {
        const float y = to_float(yc[c * p.y_s1]);
        dxc[c * p.inner] = from_float<TX>(p.scale * y * (to_float(dc[c * p.dy_s1]) - s));
      }
    }
  }
}

}  // namespace
}  // namespace softmax_impl
}  // namespace ftfm

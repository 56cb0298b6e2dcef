// Softmax kernels, last axis, backward: dx = scale * y * (dy - sum(y * dy)) on the rows, staged and
// split paths (included by softmax.cu only, after softmax_fwd.cuh).
#pragma once
#include "softmax_fwd.cuh"

namespace ftfm {
namespace softmax_impl {
namespace {

// ---- backward, last axis ----------------------------------------------------------------------------
// dx for VEC columns at c from y, dy vectors (zeros where hidden: dx = 0 there).
template <typename TY, typename TX, int VEC>
__device__ __forceinline__ void store_dx(TX* dst, const Vec<TY, VEC>& y, const Vec<TY, VEC>& dy, float dot,
                                         float scale) {
  Vec<TX, VEC> o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = from_float<TX>(scale * to_float(y.v[j]) * (to_float(dy.v[j]) - dot));
  store_vec(dst, o);
}
template <typename TY, int VEC>
__device__ __forceinline__ float dot_vec(const Vec<TY, VEC>& y, const Vec<TY, VEC>& dy) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) s += to_float(y.v[j]) * to_float(dy.v[j]);
  return s;
}
__device__ __forceinline__ int causal_vis(const Common& k, int64_t row) { return row_ctx(k, SoftmaxMask{}, row).vis; }

// The thread-layout prologue (tpr, lane, rpb, group) repeats softmax_fwd_rows_kernel's on purpose: each
// kernel's index math stays next to the loads that use it, as in the other kernels here.
template <typename TY, typename TX, int VEC, int ITERS>
__global__ void __launch_bounds__(kBwdMaxThreads) softmax_bwd_rows_kernel(BwdParams<TY, TX> p) {
  __shared__ float red_smem[64];
  const int tpr = p.k.tpr, lane = static_cast<int>(threadIdx.x) % tpr, rpb = static_cast<int>(blockDim.x) / tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  GroupReducer<float> red(red_smem, tpr);
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < p.k.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t row = base + group;
    const bool valid = row < p.k.rows;
    const int vis = valid ? causal_vis(p.k, row) : 0;
    RowFrag<TY, VEC, ITERS> y, dy;  // zeros where not read
    y.load(p.y + (valid ? row : 0) * p.y_stride, 0, lane, tpr, vis);
    dy.load(p.dy + (valid ? row : 0) * p.dy_stride, 0, lane, tpr, vis);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) s += dot_vec(y.v[i], dy.v[i]);
    s = red.allreduce(s, SumOp());
    if (!valid) continue;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = y.col(i, lane, tpr, 0);
      if (c < p.k.cols) store_dx(p.dx + row * p.k.cols + c, y.v[i], dy.v[i], s, p.k.scale);
    }
  }
}

// One block per row; the thread's y and dy slices parked in shared memory ([cols] y, then [cols] dy).
template <typename TY, typename TX, int VEC>
__global__ void __launch_bounds__(kStagedThreads) softmax_bwd_staged_kernel(BwdParams<TY, TX> p) {
  __shared__ float red_smem[64];
  FTFM_DYNAMIC_SMEM(TY, park);
  const int tid = static_cast<int>(threadIdx.x), step = static_cast<int>(blockDim.x) * VEC;
  GroupReducer<float> red(red_smem, static_cast<int>(blockDim.x));
  TY* park_y = park;
  TY* park_dy = park + p.k.cols;
  for (int64_t row = blockIdx.x; row < p.k.rows; row += gridDim.x) {
    const int vis = causal_vis(p.k, row);
    float s = 0.f;
    for (int c0 = tid * VEC; c0 < p.k.cols; c0 += kUnroll * step) {
      Vec<TY, VEC> yv[kUnroll], dv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * step;
        const bool in = c < vis;
        yv[u] = in ? load_vec<VEC>(p.y + row * p.y_stride + c) : fill_vec<TY, VEC>(0.f);
        dv[u] = in ? load_vec<VEC>(p.dy + row * p.dy_stride + c) : fill_vec<TY, VEC>(0.f);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * step;
        if (c >= p.k.cols) break;
        s += dot_vec(yv[u], dv[u]);
        store_vec(park_y + c, yv[u]);
        store_vec(park_dy + c, dv[u]);
      }
    }
    s = red.allreduce(s, SumOp());
    for (int c = tid * VEC; c < p.k.cols; c += step)
      store_dx(p.dx + row * p.k.cols + c, load_vec<VEC>(park_y + c), load_vec<VEC>(park_dy + c), s, p.k.scale);
  }
}

template <typename TY, typename TX, int VEC>
__global__ void __launch_bounds__(kSplitThreads) softmax_bwd_split_dot_kernel(BwdParams<TY, TX> p) {
  __shared__ float red_smem[64];
  const int tid = static_cast<int>(threadIdx.x), step = static_cast<int>(blockDim.x) * VEC;
  GroupReducer<float> red(red_smem, static_cast<int>(blockDim.x));
  for (int64_t b = blockIdx.x; b < p.k.rows * p.k.splits; b += gridDim.x) {
    int64_t row;
    int c_begin, c_end;
    chunk_of(p.k, b, row, c_begin, c_end);
    const int lim = min(c_end, causal_vis(p.k, row));
    float s = 0.f;
    for (int c0 = c_begin + tid * VEC; c0 < lim; c0 += kUnroll * step) {
      Vec<TY, VEC> yv[kUnroll], dv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * step;
        yv[u] = c < lim ? load_vec<VEC>(p.y + row * p.y_stride + c) : fill_vec<TY, VEC>(0.f);
        dv[u] = c < lim ? load_vec<VEC>(p.dy + row * p.dy_stride + c) : fill_vec<TY, VEC>(0.f);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) s += dot_vec(yv[u], dv[u]);
    }
    s = red.allreduce(s, SumOp());
    if (tid == 0) p.k.ws[b] = s;
  }
}

template <typename TY, typename TX, int VEC>
__global__ void __launch_bounds__(kSplitThreads) softmax_bwd_split_finish_kernel(BwdParams<TY, TX> p) {
  const int tid = static_cast<int>(threadIdx.x), step = static_cast<int>(blockDim.x) * VEC;
  for (int64_t b = blockIdx.x; b < p.k.rows * p.k.splits; b += gridDim.x) {
    int64_t row;
    int c_begin, c_end;
    chunk_of(p.k, b, row, c_begin, c_end);
    const int vis = causal_vis(p.k, row);
    float dot = 0.f;
    for (int s = 0; s < p.k.splits; ++s) dot += p.k.ws[row * p.k.splits + s];
    for (int c = c_begin + tid * VEC; c < c_end; c += step) {
      const bool in = c < vis;
      store_dx(p.dx + row * p.k.cols + c, in ? load_vec<VEC>(p.y + row * p.y_stride + c) : fill_vec<TY, VEC>(0.f),
               in ? load_vec<VEC>(p.dy + row * p.dy_stride + c) : fill_vec<TY, VEC>(0.f), dot, p.k.scale);
    }
  }
}

}  // namespace
}  // namespace softmax_impl
}  // namespace ftfm

// Softmax kernels, last axis, forward: shared constants, parameters and row helpers, and the rows,
// staged and split kernels (included by softmax.cu only; the design is described there).
#pragma once
#include "include/ftfm_cuda.h"
#include "include/launchers.h"
#include "include/reduce.cuh"
#include "include/vec.cuh"

// Everything but the launcher API lives in ftfm::softmax_impl: the emulator build compiles all kernel
// files into one translation unit, where file-local names of different ops must not collide.
namespace ftfm {
namespace softmax_impl {
namespace {

// Elements per thread and tensor on the register paths: 16 with 16-byte vectors; 8 on the scalar
// forward path (every element its own load; 16 would spill at 1024 threads).
constexpr int kElems = 16;
constexpr int fwd_elems(int vec) { return vec == 1 ? 8 : kElems; }
constexpr int kFwdMaxThreads = 1024;  // threads per row, rows path
constexpr int kBwdMaxThreads = 512;
constexpr int kSmallBlock = 128;      // block size when several rows share a block
constexpr int kStagedThreads = 512;
constexpr int kSplitThreads = 512;
constexpr int kSplitChunk = 16384;    // minimum columns per chunk, split path (a multiple of every VEC)
constexpr int kMaxSplits = 64;
constexpr int kUnroll = 4;            // vectors in flight per thread in streaming loops
constexpr int kStridedThreads = 256;

struct Common {  // row-path parameters shared by forward and backward
  int64_t rows; int cols; int64_t nq; float scale; bool causal;
  int tpr; int splits; int chunk; float* ws;
};
template <typename TI, typename TO>
struct FwdParams {
  const TI* x; int64_t x_stride; TO* y; Common k; SoftmaxMask mask; bool mask_vec; bool zero_empty;
};
template <typename TY, typename TX>
struct BwdParams {
  const TY* y; int64_t y_stride; const TY* dy; int64_t dy_stride; TX* dx; Common k;
};

// ---- per-row context: mask offset and causal bound ------------------------------------------------
struct RowCtx {
  int64_t moff;  // mask offset of the row's column 0
  int vis;       // columns [0, vis) are visible (not causally hidden); == cols when not causal
};
__device__ __forceinline__ RowCtx row_ctx(const Common& k, const SoftmaxMask& m, int64_t row) {
  RowCtx r{0, k.cols};
  const int64_t q = row % k.nq, t = row / k.nq;
  if (k.causal) {
    const int64_t v = q + 1 + (k.cols - k.nq);  // bottom-right aligned: key c visible iff c <= q + nk - nq
    r.vis = v < 0 ? 0 : (v < k.cols ? static_cast<int>(v) : k.cols);
  }
  if (m.ptr) r.moff = (t / m.d1) * m.s0 + (t % m.d1) * m.s1 + q * m.sq;
  return r;
}

// Logits z of the VEC columns starting at c (x vector already loaded, zeros where not read).
template <typename TI, typename TO, int VEC>
__device__ __forceinline__ void logits(const FwdParams<TI, TO>& p, const RowCtx& rc, int c, const Vec<TI, VEC>& xv,
                                       float (&z)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) z[j] = c + j < rc.vis ? to_float(xv.v[j]) * p.k.scale : -INFINITY;
  if (!p.mask.ptr || c >= rc.vis) return;
  if (p.mask.is_bool) {
    const uint8_t* mb = static_cast<const uint8_t*>(p.mask.ptr) + rc.moff;
    if (VEC > 1 && p.mask_vec) {
      const Vec<uint8_t, VEC> keep = load_vec<VEC>(mb + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] = keep.v[j] ? z[j] : -INFINITY;
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (c + j < rc.vis && !mb[(c + j) * p.mask.sk]) z[j] = -INFINITY;
    }
  } else {
    const TI* ma = static_cast<const TI*>(p.mask.ptr) + rc.moff;
    if (VEC > 1 && p.mask_vec) {
      const Vec<TI, VEC> add = load_vec<VEC>(ma + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] = c + j < rc.vis ? z[j] + to_float(add.v[j]) : -INFINITY;
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (c + j < rc.vis) z[j] += to_float(ma[(c + j) * p.mask.sk]);
    }
  }
}

// Online (max, sum of exp(z - max)) of one thread: `add` folds in VEC logits with one rescale.
struct Online {
  float m = -INFINITY, s = 0.f;
  template <int VEC>
  __device__ __forceinline__ void add(const float (&z)[VEC]) {
    float vm = z[0];
#pragma unroll
    for (int j = 1; j < VEC; ++j) vm = fmaxf(vm, z[j]);
    if (vm > m) {
      s = m == -INFINITY ? 0.f : s * __expf(m - vm);
      m = vm;
    }
    if (m == -INFINITY) return;
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += __expf(z[j] - m);
  }
  // This thread's sum rescaled to the group max M (0 when it saw nothing above -inf).
  __device__ __forceinline__ float sum_at(float M) const { return m == -INFINITY ? 0.f : s * __expf(m - M); }
};

template <typename TO, int VEC>
__device__ __forceinline__ void store_probs(TO* dst, const float (&e)[VEC], float inv) {
  Vec<TO, VEC> o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = from_float<TO>(e[j] * inv);
  store_vec(dst, o);
}

// exp(z - M) for the output, or 0 for an empty row under zero_empty.
__device__ __forceinline__ float prob_num(float z, float M, bool zero) { return zero ? 0.f : __expf(z - M); }

// ---- forward, rows in registers ---------------------------------------------------------------------
template <typename TI, typename TO, int VEC, int ITERS>
__global__ void __launch_bounds__(kFwdMaxThreads) softmax_fwd_rows_kernel(FwdParams<TI, TO> p) {
  __shared__ float red_smem[64];
  const int tpr = p.k.tpr, lane = static_cast<int>(threadIdx.x) % tpr, rpb = static_cast<int>(blockDim.x) / tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  GroupReducer<float> red(red_smem, tpr);
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < p.k.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t row = base + group;
    const bool valid = row < p.k.rows;  // idle groups still join the reductions
    RowCtx rc = row_ctx(p.k, p.mask, valid ? row : 0);
    if (!valid) rc.vis = 0;
    const TI* xrow = p.x + (valid ? row : 0) * p.x_stride;
    float z[ITERS][VEC];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = (i * tpr + lane) * VEC;
      logits(p, rc, c, c < rc.vis ? load_vec<VEC>(xrow + c) : fill_vec<TI, VEC>(0.f), z[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = fmaxf(m, z[i][j]);
    }
    m = red.allreduce(m, MaxOp());
    const bool zero = p.zero_empty && m == -INFINITY;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        z[i][j] = prob_num(z[i][j], m, zero);
        s += z[i][j];
      }
    s = red.allreduce(s, SumOp());
    if (!valid) continue;
    const float inv = zero ? 0.f : 1.f / s;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = (i * tpr + lane) * VEC;
      if (c < p.k.cols) store_probs(p.y + row * p.k.cols + c, z[i], inv);
    }
  }
}

// ---- forward, one block per row, the thread's slice parked in shared memory --------------------------
// LOGITS: park the fp32 logits (masked rows: the mask is read once); else park raw x (TI) and
// recompute x * scale and the causal bound, which need no memory.
template <bool LOGITS, typename TI, typename TO, int VEC>
__device__ __forceinline__ void staged_row(const FwdParams<TI, TO>& p, GroupReducer<float>& red, unsigned char* park,
                                           int64_t row) {
  const int tid = static_cast<int>(threadIdx.x), step = static_cast<int>(blockDim.x) * VEC;
  float* park_z = reinterpret_cast<float*>(park);
  TI* park_x = reinterpret_cast<TI*>(park);
  const RowCtx rc = row_ctx(p.k, p.mask, row);
  const TI* xrow = p.x + row * p.x_stride;
  Online acc;
  for (int c0 = tid * VEC; c0 < p.k.cols; c0 += kUnroll * step) {
    Vec<TI, VEC> xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * step;
      xv[u] = c < rc.vis ? load_vec<VEC>(xrow + c) : fill_vec<TI, VEC>(0.f);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * step;
      if (c >= p.k.cols) break;
      float z[VEC];
      logits(p, rc, c, xv[u], z);
      acc.add(z);
      if constexpr (LOGITS) {
        Vec<float, VEC> zv;
#pragma unroll
        for (int j = 0; j < VEC; ++j) zv.v[j] = z[j];
        store_vec(park_z + c, zv);
      } else {
        store_vec(park_x + c, xv[u]);
      }
    }
  }
  const float M = red.allreduce(acc.m, MaxOp());
  const float sum = red.allreduce(acc.sum_at(M), SumOp());
  const bool zero = p.zero_empty && M == -INFINITY;
  const float inv = zero ? 0.f : 1.f / sum;
  for (int c = tid * VEC; c < p.k.cols; c += step) {  // reads back only what this thread parked
    float z[VEC];
    if constexpr (LOGITS) {
      const Vec<float, VEC> zv = load_vec<VEC>(park_z + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] = zv.v[j];
    } else {
      logits(p, rc, c, load_vec<VEC>(park_x + c), z);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = prob_num(z[j], M, zero);
    store_probs(p.y + row * p.k.cols + c, z, inv);
  }
}

template <typename TI, typename TO, int VEC>
__global__ void __launch_bounds__(kStagedThreads) softmax_fwd_staged_kernel(FwdParams<TI, TO> p) {
  __shared__ float red_smem[64];
  FTFM_DYNAMIC_SMEM(unsigned char, park);
  GroupReducer<float> red(red_smem, static_cast<int>(blockDim.x));
  for (int64_t row = blockIdx.x; row < p.k.rows; row += gridDim.x) {
    if (p.mask.ptr)
      staged_row<true, TI, TO, VEC>(p, red, park, row);
    else
      staged_row<false, TI, TO, VEC>(p, red, park, row);
  }
}

// ---- forward, split rows: per-chunk (max, sum), then merge and write ---------------------------------
__device__ __forceinline__ void chunk_of(const Common& k, int64_t b, int64_t& row, int& c_begin, int& c_end) {
  row = b / k.splits;
  c_begin = static_cast<int>(b % k.splits) * k.chunk;
  c_end = min(k.cols, c_begin + k.chunk);
}

template <typename TI, typename TO, int VEC>
__global__ void __launch_bounds__(kSplitThreads) softmax_fwd_split_stats_kernel(FwdParams<TI, TO> p) {
  __shared__ float red_smem[64];
  const int tid = static_cast<int>(threadIdx.x), step = static_cast<int>(blockDim.x) * VEC;
  GroupReducer<float> red(red_smem, static_cast<int>(blockDim.x));
  for (int64_t b = blockIdx.x; b < p.k.rows * p.k.splits; b += gridDim.x) {
    int64_t row;
    int c_begin, c_end;
    chunk_of(p.k, b, row, c_begin, c_end);
    const RowCtx rc = row_ctx(p.k, p.mask, row);
    const TI* xrow = p.x + row * p.x_stride;
    Online acc;
    for (int c0 = c_begin + tid * VEC; c0 < c_end; c0 += kUnroll * step) {
      Vec<TI, VEC> xv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * step;
        xv[u] = c < c_end && c < rc.vis ? load_vec<VEC>(xrow + c) : fill_vec<TI, VEC>(0.f);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * step;
        if (c >= c_end) break;
        float z[VEC];
        logits(p, rc, c, xv[u], z);
        acc.add(z);
      }
    }
    const float M = red.allreduce(acc.m, MaxOp());
    const float sum = red.allreduce(acc.sum_at(M), SumOp());
    if (tid == 0) {
      p.k.ws[2 * b] = M;
      p.k.ws[2 * b + 1] = sum;
    }
  }
}

template <typename TI, typename TO, int VEC>
__global__ void __launch_bounds__(kSplitThreads) softmax_fwd_split_finish_kernel(FwdParams<TI, TO> p) {
  const int tid = static_cast<int>(threadIdx.x), step = static_cast<int>(blockDim.x) * VEC;
  for (int64_t b = blockIdx.x; b < p.k.rows * p.k.splits; b += gridDim.x) {
    int64_t row;
    int c_begin, c_end;
    chunk_of(p.k, b, row, c_begin, c_end);
    const RowCtx rc = row_ctx(p.k, p.mask, row);
    const float* ws = p.k.ws + 2 * row * p.k.splits;
    float M = -INFINITY, sum = 0.f;  // same order in every thread and block of the row
    for (int s = 0; s < p.k.splits; ++s) M = fmaxf(M, ws[2 * s]);
    for (int s = 0; s < p.k.splits; ++s) sum += ws[2 * s] == -INFINITY ? 0.f : ws[2 * s + 1] * __expf(ws[2 * s] - M);
    const bool zero = p.zero_empty && M == -INFINITY;
    const float inv = zero ? 0.f : 1.f / sum;
    const TI* xrow = p.x + row * p.x_stride;
    for (int c = c_begin + tid * VEC; c < c_end; c += step) {
      float z[VEC];
      logits(p, rc, c, c < rc.vis ? load_vec<VEC>(xrow + c) : fill_vec<TI, VEC>(0.f), z);
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] = prob_num(z[j], M, zero);
      store_probs(p.y + row * p.k.cols + c, z, inv);
    }
  }
}

}  // namespace
}  // namespace softmax_impl
}  // namespace ftfm

// Fused LayerNorm / RMSNorm, forward and backward (launcher API: include/launchers.h).
//
// Shapes: x, dy [rows, cols] (row stride given, columns contiguous); y, dx [rows, cols] contiguous;
// weight, bias [cols] (optional); mean, rstd [rows] fp32. All math and statistics in fp32.
//   LayerNorm  mean = sum(x)/cols, var = sum((x-mean)^2)/cols (biased), rstd = 1/sqrt(var + eps),
//              xhat = (x - mean) * rstd,  y = xhat * w + b
//   RMSNorm    rstd = 1/sqrt(sum(x^2)/cols + eps), xhat = x * rstd, y = xhat * w
//   Backward   g = dy * w;  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMS: no mean(g) term)
//              dw = sum_rows dy * xhat,  db = sum_rows dy  -- deterministic, in two stages: stage 1 writes
//              fp32 partial sums per group of rows ("part") into dw_partial/db_partial [parts, cols];
//              stage 2 (layer_norm_bwd_reduce_kernel) adds the parts in a fixed order. No float atomics.
//
// Performance intent (H100 SXM: 3.35 TB/s HBM3, ~3.0 TB/s measured device-to-device copy).
// Minimum traffic: forward reads x and writes y once; backward reads x, dy and writes dx once, plus the
// partials (2 x parts x cols x 4 B, written once and read once: ~8% at 4096 cols and 16384 rows).
//   16384 x 4096 bf16 forward:  128 MiB in + 128 MiB out = 256 MiB -> floor ~90 us at 3.0 TB/s
//   16384 x 4096 bf16 backward: 256 MiB in + 128 MiB out = 384 MiB -> floor ~134 us (+~11 us partials)
// Targets: forward >= 90% and backward >= 80% of copy bandwidth for cols >= 4096. Design:
//   * 16-byte vector loads/stores (8 x fp16/bf16, 4 x fp32) when cols % VEC == 0 and all pointers and
//     row strides are 16-byte aligned; otherwise the same kernels with VEC = 1 (any width/alignment).
//   * Register-resident rows: a row group of `tpr` threads holds a row (ELEMS elements per thread, kept
//     packed in the input dtype), so x (and dy) are read from HBM exactly once. tpr is a power of two
//     <= 32 (several rows per 128-thread block, shuffles only) or a multiple of 32 up to 1024 (forward)
//     / 512 (backward) with one row per block and one barrier per row. Warp-contiguous 16-byte accesses
//     are fully coalesced; shared memory holds per-warp partials (and, once per backward block, padded
//     column sums): no bank conflicts. Statistics: exact two-pass per thread, merged with Chan's formula
//     (no E[x^2] - mean^2). Capacity (columns): forward 16384 vector / 8192 scalar, backward 8192 / 4096.
//   * Wider rows ("long" kernels, one 512-thread block per row): forward accumulates the statistics in
//     one pass, then re-reads x to normalize (that second read of a <= 512 KiB row mostly hits L2).
//     Backward takes 32 rows at a time: pass A computes the two row sums, pass B walks column chunks,
//     writes dx and adds dw/db into the block's own partial row. x and dy are read twice (~60% of the
//     floor): fine for very wide or misaligned rows, the known gap for fp16/bf16 8192 < cols <= 16384.
//   * Backward keeps dw/db column sums in registers across all rows of a part; weight is loaded once.
#include "include/ftfm_cuda.h"
#include "include/launchers.h"
#include "include/dispatch.cuh"
#include "include/reduce.cuh"
#include "include/vec.cuh"

#include <algorithm>

namespace ftfm {
namespace {

// Row elements per thread (ELEMS) in registers: 16 (2 x 16 B for fp16/bf16, 4 x 16 B for fp32) on the
// vector path, 8 on the scalar path (each element then needs its own address and bounds check).
constexpr int elems_per_thread(int vec) { return vec == 1 ? 8 : 16; }
constexpr int kFwdMaxThreads = 1024;  // threads per row, register kernels
constexpr int kBwdMaxThreads = 512;
constexpr int kSmallBlock = 128;      // block size when several rows share a block
constexpr int kLongThreads = 512;     // block size of the long-row kernels
constexpr int kLongRowChunk = 32;     // rows per pass of layer_norm_bwd_long_kernel

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T, typename W>
struct FwdParams {
  const T* x; int64_t x_stride; const W* w; const W* b; T* y; float* mean; float* rstd;
  int64_t rows; int cols; float rcols; float eps; bool rms;  // rcols = 1 / cols
  int tpr;  // threads per row (register kernel)
};
template <typename T, typename W>
struct BwdParams {
  const T* dy; int64_t dy_stride; const T* x; int64_t x_stride; const W* w; const float* mean;
  const float* rstd; T* dx; float* dw_part; float* db_part;
  int64_t rows; int cols; float rcols; bool rms; int tpr; int64_t rows_per_part;
};

// Per-thread forward statistics, accumulated over fragments and then reduced over the row's threads.
// LayerNorm: exact (two-pass) count/mean/m2 of each fragment's in-range elements, Chan-merged, so one
// reduction (one barrier) gives mean and variance without E[x^2] - mean^2 cancellation. RMS: sum(x^2).
struct FwdStats {
  MeanM2 st{0.f, 0.f, 0.f};
  float sq = 0.f;
  template <typename T, int VEC, int ITERS>
  __device__ __forceinline__ void add(const RowFrag<T, VEC, ITERS>& x, bool rms, int col0, int lane, int tpr,
                                      int limit) {
    float n = 0.f, s = 0.f, m2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += rms ? x.f(i, j) * x.f(i, j) : x.f(i, j);  // zeros out of range
    if (rms) {
      sq += s;
      return;
    }
#pragma unroll
    for (int i = 0; i < ITERS; ++i) n += x.col(i, lane, tpr, col0) < limit ? VEC : 0;
    const float mean = n > 0.f ? __fdividef(s, n) : 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
      if (x.col(i, lane, tpr, col0) < limit)
#pragma unroll
        for (int j = 0; j < VEC; ++j) m2 += (x.f(i, j) - mean) * (x.f(i, j) - mean);
    st = chan_merge(st, MeanM2{n, mean, m2});
  }
  // Row mean (0 for RMS) and rstd; every thread of the group calls it (uniform control flow).
  __device__ __forceinline__ void finish(GroupReducer<MeanM2>& red_st, GroupReducer<float>& red_sq, bool rms,
                                         float rcols, float eps, float& mean, float& rstd) {
    float var;
    if (rms) {
      mean = 0.f;
      var = red_sq.allreduce(sq, SumOp()) * rcols;
    } else {
      const MeanM2 r = red_st.allreduce(st, ChanOp());
      mean = r.mean;
      var = r.m2 * rcols;
    }
    rstd = rsqrtf(var + eps);
  }
};

// y = (x - mean) * rstd * w + b for one fragment (w = 1 / b = 0 when absent).
template <typename T, typename W, int VEC, int ITERS>
__device__ __forceinline__ void normalize_store(const RowFrag<T, VEC, ITERS>& x, const FwdParams<T, W>& p, T* yrow,
                                                float mean, float rstd, int col0, int lane, int tpr) {
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = x.col(i, lane, tpr, col0);
    if (c >= p.cols) continue;
    const Vec<W, VEC> w = load_vec_or<VEC>(p.w, c, 1.f), b = load_vec_or<VEC>(p.b, c, 0.f);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      out.v[j] = from_float<T>((x.f(i, j) - mean) * rstd * to_float(w.v[j]) + to_float(b.v[j]));
    store_vec(yrow + c, out);
  }
}

// ---- forward, row in registers. grid-stride over blocks of rpb = blockDim.x / tpr rows ---------------
template <typename T, typename W, int VEC, int ITERS>
__global__ void __launch_bounds__(kFwdMaxThreads) layer_norm_fwd_kernel(FwdParams<T, W> p) {
  __shared__ MeanM2 st_smem[64];
  __shared__ float sq_smem[64];
  const int tpr = p.tpr, lane = static_cast<int>(threadIdx.x) % tpr, rpb = static_cast<int>(blockDim.x) / tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  GroupReducer<MeanM2> red_st(st_smem, tpr);
  GroupReducer<float> red_sq(sq_smem, tpr);
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < p.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t row = base + group;
    const bool valid = row < p.rows;  // idle groups still join the reductions
    const int limit = valid ? p.cols : 0;
    RowFrag<T, VEC, ITERS> x;
    x.load(p.x + (valid ? row : 0) * p.x_stride, 0, lane, tpr, limit);
    FwdStats stats;
    stats.add(x, p.rms, 0, lane, tpr, limit);
    float mean, rstd;
    stats.finish(red_st, red_sq, p.rms, p.rcols, p.eps, mean, rstd);
    if (!valid) continue;
    if (lane == 0) {
      if (p.mean) p.mean[row] = mean;
      if (p.rstd) p.rstd[row] = rstd;
    }
    normalize_store(x, p, p.y + row * p.cols, mean, rstd, 0, lane, tpr);
  }
}

// ---- forward, rows of any width: one block per row, Chan statistics in one pass, then re-read x -------
template <typename T, typename W, int VEC, int ITERS>
__global__ void __launch_bounds__(kLongThreads, 2) layer_norm_fwd_long_kernel(FwdParams<T, W> p) {
  __shared__ MeanM2 st_smem[64];
  __shared__ float sq_smem[64];
  const int tid = static_cast<int>(threadIdx.x), nthr = static_cast<int>(blockDim.x), chunk = nthr * ITERS * VEC;
  GroupReducer<MeanM2> red_st(st_smem, nthr);
  GroupReducer<float> red_sq(sq_smem, nthr);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xrow = p.x + row * p.x_stride;
    RowFrag<T, VEC, ITERS> x;
    FwdStats stats;
    for (int c0 = 0; c0 < p.cols; c0 += chunk) {
      x.load(xrow, c0, tid, nthr, p.cols);
      stats.add(x, p.rms, c0, tid, nthr, p.cols);
    }
    float mean, rstd;
    stats.finish(red_st, red_sq, p.rms, p.rcols, p.eps, mean, rstd);
    if (tid == 0) {
      if (p.mean) p.mean[row] = mean;
      if (p.rstd) p.rstd[row] = rstd;
    }
    for (int c0 = 0; c0 < p.cols; c0 += chunk) {  // second read of the row: mostly from L2
      x.load(xrow, c0, tid, nthr, p.cols);
      normalize_store(x, p, p.y + row * p.cols, mean, rstd, c0, tid, nthr);
    }
  }
}

// Stage-1 output of the backward: this thread's column sums `acc` into the part's row `out` [cols]
// (out += acc when `accumulate`). With several row groups per block (rpb > 1) the groups' sums meet in
// `comb` (ELEMS x (blockDim.x + tpr) floats of dynamic shared memory, padded so neither phase has bank
// conflicts) and every thread then adds the rpb values of some (element, lane) slots in group order.
template <int VEC, int ITERS>
__device__ __forceinline__ void store_partial(float* out, float (&acc)[ITERS][VEC], float* comb, int lane, int tpr,
                                              int group, int rpb, int col0, int cols, bool accumulate) {
  if (rpb == 1) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = RowFrag<float, VEC, ITERS>::col(i, lane, tpr, col0);
      if (c < cols)
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[c + j] = accumulate ? out[c + j] + acc[i][j] : acc[i][j];
    }
    return;
  }
  const int nthr = rpb * tpr, tid = group * tpr + lane, stride = nthr + tpr;
  __syncthreads();  // comb is free
#pragma unroll
  for (int e = 0; e < ITERS * VEC; ++e) comb[e * stride + tid] = acc[e / VEC][e % VEC];
  __syncthreads();
  for (int slot = tid; slot < ITERS * VEC * tpr; slot += nthr) {
    const int e = slot / tpr, l = slot % tpr;
    const int c = RowFrag<float, VEC, ITERS>::col(e / VEC, l, tpr, col0) + e % VEC;
    float s = 0.f;
    for (int g = 0; g < rpb; ++g) s += comb[e * stride + g * tpr + l];
    if (c < cols) out[c] = accumulate ? out[c] + s : s;
  }
}

// The backward's per-element math for one fragment of one row (w = 1 outside the row / without weight):
//   bwd_sums:  (sum g, sum g * xhat) over the fragment, g = dy * w, xhat = (x - mu) * rs
//   bwd_apply: dx = rs * (g - c1 - xhat * c2) stored at dxrow, and dw += dy * xhat, db += dy.
template <typename T, typename W, int VEC, int ITERS>
__device__ __forceinline__ Sum2 bwd_sums(const RowFrag<T, VEC, ITERS>& x, const RowFrag<T, VEC, ITERS>& dy,
                                         const Vec<W, VEC> (&w)[ITERS], float mu, float rs) {
  Sum2 s{0.f, 0.f};
#pragma unroll
  for (int i = 0; i < ITERS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float g = __fmul_rn(dy.f(i, j), to_float(w[i].v[j]));  // rounded as in bwd_apply (no FMA)
      s.a += g;
      s.b += g * ((x.f(i, j) - mu) * rs);
    }
  return s;
}
template <typename T, typename W, int VEC, int ITERS>
__device__ __forceinline__ void bwd_apply(const RowFrag<T, VEC, ITERS>& x, const RowFrag<T, VEC, ITERS>& dy,
                                          const Vec<W, VEC> (&w)[ITERS], float mu, float rs, Sum2 c, T* dxrow,
                                          int col0, int lane, int tpr, int cols, float (&dw)[ITERS][VEC],
                                          float (&db)[ITERS][VEC]) {
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = x.col(i, lane, tpr, col0);
    if (col >= cols) continue;
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      // g rounded on its own (__fmul_rn is never contracted): nvcc fused d * w into g - mean(g), so a
      // 1-column row (exact answer 0) got rstd x the product's rounding error (2e-6 fp32 on an H200)
      const float xh = (x.f(i, j) - mu) * rs, d = dy.f(i, j), g = __fmul_rn(d, to_float(w[i].v[j]));
      out.v[j] = from_float<T>(rs * (g - c.a - xh * c.b));
      dw[i][j] += d * xh;
      db[i][j] += d;
    }
    store_vec(dxrow + col, out);
  }
}
// This thread's weight vectors for the fragment at col0 (ones without weight).
template <typename W, int VEC, int ITERS>
__device__ __forceinline__ void load_weight(Vec<W, VEC> (&w)[ITERS], const W* wp, int col0, int lane, int tpr,
                                            int cols) {
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = RowFrag<W, VEC, ITERS>::col(i, lane, tpr, col0);
    w[i] = c < cols ? load_vec_or<VEC>(wp, c, 1.f) : fill_vec<W, VEC>(1.f);
  }
}

// ---- backward, rows in registers. One block per part (rows [part*rpp, (part+1)*rpp)); its rpb row
// groups take rows in turn and keep their columns' dw/db sums in registers ---------------------------
template <typename T, typename W, int VEC, int ITERS>
__global__ void __launch_bounds__(kBwdMaxThreads) layer_norm_bwd_kernel(BwdParams<T, W> p) {
  __shared__ Sum2 red_smem[64];
  FTFM_DYNAMIC_SMEM(float, comb);
  const int tpr = p.tpr, lane = static_cast<int>(threadIdx.x) % tpr, rpb = static_cast<int>(blockDim.x) / tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  const int64_t part = blockIdx.x, r0 = part * p.rows_per_part, r1 = min64(p.rows, r0 + p.rows_per_part);
  GroupReducer<Sum2> red(red_smem, tpr);
  Vec<W, VEC> w[ITERS];  // the same columns for every row
  load_weight(w, p.w, 0, lane, tpr, p.cols);
  float dw[ITERS][VEC] = {}, db[ITERS][VEC] = {};
  for (int64_t base = r0; base < r1; base += rpb) {
    const int64_t row = base + group;
    const bool valid = row < r1;  // idle groups still join the reduction
    const int limit = valid ? p.cols : 0;
    RowFrag<T, VEC, ITERS> x, dy;  // zeros outside the row: no contribution to the sums
    x.load(p.x + (valid ? row : 0) * p.x_stride, 0, lane, tpr, limit);
    dy.load(p.dy + (valid ? row : 0) * p.dy_stride, 0, lane, tpr, limit);
    const float mu = valid && !p.rms ? p.mean[row] : 0.f, rs = valid ? p.rstd[row] : 0.f;
    const Sum2 s = red.allreduce(bwd_sums(x, dy, w, mu, rs), SumOp());
    if (valid)
      bwd_apply(x, dy, w, mu, rs, Sum2{p.rms ? 0.f : s.a * p.rcols, s.b * p.rcols}, p.dx + row * p.cols, 0, lane,
                tpr, p.cols, dw, db);
  }
  if (p.dw_part) store_partial(p.dw_part + part * p.cols, dw, comb, lane, tpr, group, rpb, 0, p.cols, false);
  if (p.db_part) store_partial(p.db_part + part * p.cols, db, comb, lane, tpr, group, rpb, 0, p.cols, false);
}

// ---- backward, rows of any width: one block per part, kLongRowChunk rows at a time ------------------
template <typename T, typename W, int VEC, int ITERS>
__global__ void __launch_bounds__(kLongThreads) layer_norm_bwd_long_kernel(BwdParams<T, W> p) {
  __shared__ Sum2 red_smem[64];
  __shared__ Sum2 coef[kLongRowChunk];  // per row: (mean(g), mean(g * xhat))
  const int tid = static_cast<int>(threadIdx.x), nthr = static_cast<int>(blockDim.x), chunk = nthr * ITERS * VEC;
  const int64_t part = blockIdx.x, r0 = part * p.rows_per_part, r1 = min64(p.rows, r0 + p.rows_per_part);
  GroupReducer<Sum2> red(red_smem, nthr);
  Vec<W, VEC> w[ITERS];
  RowFrag<T, VEC, ITERS> x, dy;
  for (int64_t rb = r0; rb < r1; rb += kLongRowChunk) {
    const int nr = static_cast<int>(min64(kLongRowChunk, r1 - rb));
    // pass A: the two row sums of each row of the chunk
    for (int r = 0; r < nr; ++r) {
      const int64_t row = rb + r;
      const float mu = p.rms ? 0.f : p.mean[row], rs = p.rstd[row];
      Sum2 s{0.f, 0.f};
      for (int c0 = 0; c0 < p.cols; c0 += chunk) {
        load_weight(w, p.w, c0, tid, nthr, p.cols);
        x.load(p.x + row * p.x_stride, c0, tid, nthr, p.cols);
        dy.load(p.dy + row * p.dy_stride, c0, tid, nthr, p.cols);
        s = s + bwd_sums(x, dy, w, mu, rs);
      }
      s = red.allreduce(s, SumOp());
      if (tid == 0) coef[r] = Sum2{p.rms ? 0.f : s.a * p.rcols, s.b * p.rcols};
    }
    __syncthreads();
    // pass B: dx, and this chunk's dw/db added into the part's partial row (same thread, same columns)
    for (int c0 = 0; c0 < p.cols; c0 += chunk) {
      load_weight(w, p.w, c0, tid, nthr, p.cols);
      float dw[ITERS][VEC] = {}, db[ITERS][VEC] = {};
      for (int r = 0; r < nr; ++r) {
        const int64_t row = rb + r;
        x.load(p.x + row * p.x_stride, c0, tid, nthr, p.cols);
        dy.load(p.dy + row * p.dy_stride, c0, tid, nthr, p.cols);
        bwd_apply(x, dy, w, p.rms ? 0.f : p.mean[row], p.rstd[row], coef[r], p.dx + row * p.cols, c0, tid, nthr,
                  p.cols, dw, db);
      }
      const bool acc = rb != r0;
      if (p.dw_part) store_partial(p.dw_part + part * p.cols, dw, nullptr, tid, nthr, 0, 1, c0, p.cols, acc);
      if (p.db_part) store_partial(p.db_part + part * p.cols, db, nullptr, tid, nthr, 0, 1, c0, p.cols, acc);
    }
    __syncthreads();  // coef is rewritten by the next chunk
  }
}

// ---- backward stage 2: dweight[c] = sum over parts p = 0, 1, ... of dw_part[p, c] (same for dbias).
// Block (32, 8): x picks the column (coalesced), y takes every 8th part; the 8 sums are added in order.
template <typename W>
__global__ void __launch_bounds__(256) layer_norm_bwd_reduce_kernel(const float* dw_part, const float* db_part,
                                                                    W* dweight, W* dbias, int64_t parts, int cols) {
  __shared__ float sums[2][8][33];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int c = static_cast<int>(blockIdx.x) * 32 + tx;
  float sw = 0.f, sb = 0.f;
  if (c < cols)
    for (int64_t q = ty; q < parts; q += 8) {
      if (dweight) sw += dw_part[q * cols + c];
      if (dbias) sb += db_part[q * cols + c];
    }
  sums[0][ty][tx] = sw;
  sums[1][ty][tx] = sb;
  __syncthreads();
  if (ty != 0 || c >= cols) return;
  for (int k = 1; k < 8; ++k) {
    sw += sums[0][k][tx];
    sb += sums[1][k][tx];
  }
  if (dweight) dweight[c] = from_float<W>(sw);
  if (dbias) dbias[c] = from_float<W>(sb);
}

// ---- host side ----------------------------------------------------------------------------------------
// Launcher contract (see launchers.h): rows >= 0, 0 <= cols <= 2^30; rows == 0 or cols == 0 launches
// nothing (except that the backward still writes zeros to dweight/dbias). Input row strides are free
// (any int64, 0 broadcasts one row); y and dx are contiguous. weight, bias, mean, rstd (forward) may be
// nullptr; the backward needs rstd, and mean unless rms. dweight/dbias nullptr skips them; each one
// requested needs its fp32 workspace [layer_norm_bwd_parts(rows, cols), cols] (nothing to zero first).
// Any pointer alignment works; 16-byte alignment of every pointer and cols, strides % VEC == 0 enable
// the vector path. Errors throw std::invalid_argument before any launch.
// Rows per part of the backward; parts = ceil(rows / rows_per_part) are all non-empty.
int64_t bwd_rows_per_part(int64_t rows, int64_t cols) {
  // at most 512 parts (a few waves of 128-512-thread blocks on 100+ SMs), fewer for wide rows so one
  // partial buffer stays <= 32 MiB (for cols <= 131072), at least 64.
  const int64_t max_parts = std::clamp<int64_t>((int64_t(1) << 23) / std::max<int64_t>(cols, 1), 64, 512);
  return (rows + std::min(rows, max_parts) - 1) / std::min(rows, max_parts);
}

template <typename T, typename W, int VEC>
void fwd_launch(FwdParams<T, W> p, void* stream) {
  (void)stream;  // unused by the emulator's launch
  constexpr int ITERS = elems_per_thread(VEC) / VEC;
  p.tpr = group_width(p.cols / VEC, ITERS);
  if (p.tpr <= kFwdMaxThreads) {
    const int rpb = p.tpr < kSmallBlock ? kSmallBlock / p.tpr : 1;
    auto k = layer_norm_fwd_kernel<T, W, VEC, ITERS>;
    FTFM_LAUNCH(k, grid_size((p.rows + rpb - 1) / rpb), rpb * p.tpr, 0, stream, p);
  } else {
    auto k = layer_norm_fwd_long_kernel<T, W, VEC, ITERS>;
    FTFM_LAUNCH(k, grid_size(p.rows), kLongThreads, 0, stream, p);
  }
}

template <typename T, typename W, int VEC>
void bwd_launch(BwdParams<T, W> p, int64_t parts, void* stream) {
  (void)stream;
  constexpr int ITERS = elems_per_thread(VEC) / VEC;
  p.tpr = group_width(p.cols / VEC, ITERS);
  if (p.tpr <= kBwdMaxThreads) {
    const int rpb = p.tpr < kSmallBlock ? kSmallBlock / p.tpr : 1;
    const size_t smem = rpb > 1 ? sizeof(float) * (rpb + 1) * p.tpr * ITERS * VEC : 0;
    auto k = layer_norm_bwd_kernel<T, W, VEC, ITERS>;
    FTFM_LAUNCH(k, grid_size(parts), rpb * p.tpr, smem, stream, p);
  } else {
    auto k = layer_norm_bwd_long_kernel<T, W, VEC, ITERS>;
    FTFM_LAUNCH(k, grid_size(parts), kLongThreads, 0, stream, p);
  }
}

void check(bool ok, const char* op, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("fasttfm: ") + op + ": " + what);
}

}  // namespace

void layer_norm_fwd(const void* x, int64_t x_row_stride, const void* weight, const void* bias, void* y, float* mean,
                    float* rstd, int64_t rows, int64_t cols, float eps, bool rms, DType x_dtype, DType w_dtype,
                    void* stream) {
  const char* op = "layer_norm_fwd";
  check(rows >= 0 && cols >= 0 && cols <= (int64_t(1) << 30), op, "rows and cols must be in [0, 2^30]");
  if (rows == 0 || cols == 0) return;
  check(x && y, op, "x and y must be non-null");
  if (rows == 1) x_row_stride = cols;  // unused; keeps the row aligned for the vector test
  if (!weight && !bias) w_dtype = x_dtype;
  dispatch_float(x_dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_weight<T>(w_dtype, op, [&](auto wtag) {
      using W = typename decltype(wtag)::type;
      constexpr int V = VecWidth<T>::value;
      const FwdParams<T, W> p{static_cast<const T*>(x), x_row_stride, static_cast<const W*>(weight),
                              static_cast<const W*>(bias), static_cast<T*>(y), mean, rstd, rows,
                              static_cast<int>(cols), 1.f / static_cast<float>(cols), eps, rms, 0};
      const bool vec = cols % V == 0 && x_row_stride % V == 0 && aligned16(x) && aligned16(y) && aligned16(weight) &&
                       aligned16(bias);
      vec ? fwd_launch<T, W, V>(p, stream) : fwd_launch<T, W, 1>(p, stream);
    });
  });
}

int64_t layer_norm_bwd_parts(int64_t rows, int64_t cols) {
  if (rows <= 0) return 0;
  const int64_t rpp = bwd_rows_per_part(rows, cols);
  return (rows + rpp - 1) / rpp;
}

void layer_norm_bwd(const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride, const void* weight,
                    const float* mean, const float* rstd, void* dx, float* dw_partial, float* db_partial,
                    void* dweight, void* dbias, int64_t rows, int64_t cols, bool rms, DType x_dtype, DType w_dtype,
                    void* stream) {
  const char* op = "layer_norm_bwd";
  check(rows >= 0 && cols >= 0 && cols <= (int64_t(1) << 30), op, "rows and cols must be in [0, 2^30]");
  if (cols == 0) return;
  const int64_t parts = layer_norm_bwd_parts(rows, cols);
  check((!dweight || dw_partial || parts == 0) && (!dbias || db_partial || parts == 0), op,
        "dw_partial/db_partial [layer_norm_bwd_parts(rows, cols), cols] are required for dweight/dbias");
  if (!weight && !dweight && !dbias) w_dtype = x_dtype;
  dispatch_float(x_dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_weight<T>(w_dtype, op, [&](auto wtag) {
      using W = typename decltype(wtag)::type;
      constexpr int V = VecWidth<T>::value;
      if (rows > 0) {
        check(dy && x && dx && rstd && (rms || mean), op, "dy, x, dx, rstd (and mean for LayerNorm) must be non-null");
        if (rows == 1) dy_row_stride = x_row_stride = cols;
        const BwdParams<T, W> p{static_cast<const T*>(dy), dy_row_stride, static_cast<const T*>(x), x_row_stride,
                                static_cast<const W*>(weight), mean, rstd, static_cast<T*>(dx),
                                dweight ? dw_partial : nullptr, dbias ? db_partial : nullptr, rows,
                                static_cast<int>(cols), 1.f / static_cast<float>(cols), rms, 0,
                                bwd_rows_per_part(rows, cols)};
        const bool vec = cols % V == 0 && dy_row_stride % V == 0 && x_row_stride % V == 0 && aligned16(dy) &&
                         aligned16(x) && aligned16(dx) && aligned16(weight);
        vec ? bwd_launch<T, W, V>(p, parts, stream) : bwd_launch<T, W, 1>(p, parts, stream);
      }
      if (dweight || dbias) {  // rows == 0: zeros
        auto k = layer_norm_bwd_reduce_kernel<W>;
        FTFM_LAUNCH(k, grid_size((cols + 31) / 32), dim3(32, 8), 0, stream, dw_partial, db_partial,
                    static_cast<W*>(dweight), static_cast<W*>(dbias), parts, static_cast<int>(cols));
      }
    });
  });
}

}  // namespace ftfm

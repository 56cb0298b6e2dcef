// Fused softmax: any axis, scaled / masked / causal, forward and backward (API: include/launchers.h).
//
// Shapes: x viewed as [outer, C, inner], softmax over C; y, dx new contiguous [outer, C, inner].
//   forward   z = x * scale (+ additive mask; -inf where a bool mask is false or a key is causally
//             hidden), y = exp(z - max z) / sum exp(z - max z); fp32 math for every dtype.
//   backward  dx = scale * y * (dy - sum(y * dy)); dx is a new buffer, dy is never written.
// Rows whose max is -inf (no visible key) give y = 0 when zero_empty (the masked op), NaN otherwise
// (torch.softmax's result). Their gradient is 0 either way in the masked op, since y = 0 there.
//
// Paths, last axis (inner == 1: rows of C = cols elements, unit column stride):
//   * rows     (cols <= 16384 fwd / 8192 bwd): a group of `tpr` threads holds a row in registers,
//              16 elements per thread, so x (y, dy) is read once. tpr <= 32: warp-per-row, several
//              rows per 128-thread block, shuffles only; tpr 64..1024: block-per-row, one barrier per
//              reduction. Exact two-pass max / sum over the registers.
//   * staged   (rows that fit the device's opt-in shared memory, e.g. <= ~116K bf16 / ~58K fp32
//              columns forward on sm_90): one block per row; each thread parks its own slice of the
//              row in shared memory (raw x, or fp32 logits when masked) while keeping an online
//              (max, sum); no barrier is needed for the parked data since every thread reads back
//              only what it wrote. Still one read of x.
//   * split    (longer rows, or too few rows to fill the GPU): each row is cut into chunks of
//              16384+ columns, one block per (row, chunk): a stats kernel writes each chunk's
//              (max, sum) (backward: partial sum(y*dy)) to an fp32 workspace, a finish kernel merges
//              the row's partials in a fixed order and re-reads its chunk to write the output.
//              Traffic: 2 reads + 1 write (the price of rows that do not fit on one SM without
//              thread-block clusters), any number of columns, full parallelism even for one row.
// Other axes (inner > 1): no transpose copy. A 256-thread block takes TX consecutive inner indices
// (coalesced loads along the contiguous axis) x TY threads along C; the C reduction is warp shuffles
// plus one shared-memory step. C <= TY * 16 is held in registers (one read); longer C is read twice.
//
// Vector path: 16-byte loads/stores when cols % VEC == 0 and pointers and row strides are aligned
// (bool / additive masks too when their key stride is 1 and aligned), else VEC = 1. Offsets are
// int64 (rows * stride may exceed 2^31); columns are int (<= 2^30). Reductions are deterministic.
#include "include/ftfm_cuda.h"
#include "include/launchers.h"
#include "include/dispatch.cuh"
#include "include/reduce.cuh"
#include "include/vec.cuh"

#include <algorithm>

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

#include "softmax_strided.cuh"  // inner > 1 kernels

// ---- host side ----------------------------------------------------------------------------------------
// Launcher contract (launchers.h): outer >= 0, inner >= 1, 0 <= C <= 2^30; empty tensors launch nothing.
// Errors throw std::invalid_argument before any launch. Any alignment works (16-byte alignment of the
// pointers and VEC-multiple columns/strides enable the vector path).
namespace ftfm {
namespace softmax_impl {
namespace {

void check(bool ok, const char* op, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string("fasttfm: ") + op + ": " + what);
}

// f(TypeTag<TO>{}) with TO = T or float (the output of a fused upcast); anything else throws.
template <typename T, typename F>
void dispatch_out(DType d, const char* op, F&& f) {
  if (d == dtype_of<T>()) {
    f(TypeTag<T>{});
  } else if (d == DType::F32) {
    f(TypeTag<float>{});
  } else {
    check(false, op, std::string("output dtype ") + dtype_name(d) + " must be the input's (" +
                         dtype_name(dtype_of<T>()) + ") or float32");
  }
}

size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

struct Limits {
  int smem;  // opt-in dynamic shared memory per block
  int sms;
};
Limits device_limits() {
#ifdef FASTTFM_EMU
  return {227 * 1024, 1};  // sm_90's limit; one "SM", so the path depends on the row width alone
#else
  int dev = 0, smem = 48 * 1024, sms = 1;
  if (cudaGetDevice(&dev) == cudaSuccess) {
    cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  return {smem, sms};
#endif
}

template <typename K>
void allow_smem(K kernel, size_t bytes) {
#ifndef FASTTFM_EMU
  if (bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) throw std::runtime_error(std::string("fasttfm: softmax: ") + cudaGetErrorString(err));
  }
#else
  (void)kernel;
  (void)bytes;
#endif
}

enum class Path { Rows, Staged, Split };
struct RowPlan {
  Path path = Path::Rows;
  int splits = 1, chunk = 0;
  size_t smem = 0;
};
constexpr size_t kSmemReserve = 1024;  // static shared memory of the kernels, and slack

// park: shared-memory bytes per column of the staged path; reg_cols: the rows path's capacity.
// Staged-or-split never depends on the vector width, so softmax_workspace_floats can plan without pointers.
RowPlan plan_rows(int64_t rows, int64_t cols, size_t park, int64_t reg_cols) {
  RowPlan plan;
  if (cols <= reg_cols) return plan;
  const Limits lim = device_limits();
  if (static_cast<size_t>(cols) * park + kSmemReserve <= static_cast<size_t>(lim.smem) && 2 * rows >= lim.sms) {
    plan.path = Path::Staged;
    plan.smem = static_cast<size_t>(cols) * park;
    return plan;
  }
  plan.path = Path::Split;
  const int64_t per = (cols + kMaxSplits - 1) / kMaxSplits;
  plan.chunk = static_cast<int>(std::max<int64_t>(kSplitChunk, (per + kSplitChunk - 1) / kSplitChunk * kSplitChunk));
  plan.splits = static_cast<int>((cols + plan.chunk - 1) / plan.chunk);
  return plan;
}

template <typename TI, typename TO, int VEC>
void fwd_launch(FwdParams<TI, TO> p, const RowPlan& plan, void* stream) {
  (void)stream;  // unused by the emulator's launch
  constexpr int ITERS = fwd_elems(VEC) / VEC;
  p.k.splits = plan.splits;
  p.k.chunk = plan.chunk;
  if (plan.path == Path::Rows) {
    p.k.tpr = group_width(p.k.cols / VEC, ITERS);
    const int rpb = p.k.tpr < kSmallBlock ? kSmallBlock / p.k.tpr : 1;
    auto k = softmax_fwd_rows_kernel<TI, TO, VEC, ITERS>;
    FTFM_LAUNCH(k, grid_size((p.k.rows + rpb - 1) / rpb), rpb * p.k.tpr, 0, stream, p);
  } else if (plan.path == Path::Staged) {
    auto k = softmax_fwd_staged_kernel<TI, TO, VEC>;
    allow_smem(k, plan.smem);
    FTFM_LAUNCH(k, grid_size(p.k.rows), kStagedThreads, plan.smem, stream, p);
  } else {
    auto stats = softmax_fwd_split_stats_kernel<TI, TO, VEC>;
    auto finish = softmax_fwd_split_finish_kernel<TI, TO, VEC>;
    FTFM_LAUNCH(stats, grid_size(p.k.rows * plan.splits), kSplitThreads, 0, stream, p);
    FTFM_LAUNCH(finish, grid_size(p.k.rows * plan.splits), kSplitThreads, 0, stream, p);
  }
}

template <typename TY, typename TX, int VEC>
void bwd_launch(BwdParams<TY, TX> p, const RowPlan& plan, void* stream) {
  (void)stream;
  constexpr int ITERS = kElems / VEC;
  p.k.splits = plan.splits;
  p.k.chunk = plan.chunk;
  if (plan.path == Path::Rows) {
    p.k.tpr = group_width(p.k.cols / VEC, ITERS);
    const int rpb = p.k.tpr < kSmallBlock ? kSmallBlock / p.k.tpr : 1;
    auto k = softmax_bwd_rows_kernel<TY, TX, VEC, ITERS>;
    FTFM_LAUNCH(k, grid_size((p.k.rows + rpb - 1) / rpb), rpb * p.k.tpr, 0, stream, p);
  } else if (plan.path == Path::Staged) {
    auto k = softmax_bwd_staged_kernel<TY, TX, VEC>;
    allow_smem(k, plan.smem);
    FTFM_LAUNCH(k, grid_size(p.k.rows), kStagedThreads, plan.smem, stream, p);
  } else {
    auto dot = softmax_bwd_split_dot_kernel<TY, TX, VEC>;
    auto finish = softmax_bwd_split_finish_kernel<TY, TX, VEC>;
    FTFM_LAUNCH(dot, grid_size(p.k.rows * plan.splits), kSplitThreads, 0, stream, p);
    FTFM_LAUNCH(finish, grid_size(p.k.rows * plan.splits), kSplitThreads, 0, stream, p);
  }
}

// Strided (inner > 1) launch shape: TX threads along inner, 256 / TX along C.
struct StridedPlan {
  int tx;
  int64_t itiles;
  bool in_regs;
};
StridedPlan plan_strided(int64_t C, int64_t inner) {
  int cap = 1;
  while (cap < inner && cap < kStridedThreads) cap <<= 1;  // inner rounded up to a power of two, <= 256
  int tx = std::min(32, cap), ty = kStridedThreads / tx;
  while (ty > 1 && int64_t(ty / 2) * kElems >= C && tx * 2 <= cap) {  // short C: more threads along inner
    tx *= 2;
    ty /= 2;
  }
  return {tx, (inner + tx - 1) / tx, C <= int64_t(ty) * kElems};
}

Common common(int64_t outer, int64_t C, int64_t nq, float scale, bool causal, float* ws) {
  return Common{outer, static_cast<int>(C), nq, scale, causal, 0, 1, 0, ws};
}

void check_shape(const char* op, int64_t outer, int64_t C, int64_t inner) {
  check(outer >= 0 && inner >= 1 && C >= 0 && C <= (int64_t(1) << 30), op,
        "need outer >= 0, inner >= 1 and 0 <= C <= 2^30");
}

int64_t workspace_floats(int64_t outer, int64_t C, int64_t inner, DType dtype, bool masked, bool backward) {
  if (inner > 1 || outer <= 0 || C <= 0) return 0;
  const size_t park = backward ? 2 * dtype_size(dtype) : (masked ? 4 : dtype_size(dtype));
  const RowPlan plan = plan_rows(outer, C, park, backward ? kBwdMaxThreads * kElems : kFwdMaxThreads * fwd_elems(1));
  if (plan.path != Path::Split) return 0;
  return outer * plan.splits * (backward ? 1 : 2);
}

void fwd(const SoftmaxFwdArgs& a, void* stream) {
  const char* op = "softmax_fwd";
  check_shape(op, a.outer, a.C, a.inner);
  if (a.outer == 0 || a.C == 0) return;
  check(a.x && a.y, op, "x and y must be non-null");
  check(a.inner == 1 || (!a.mask.ptr && !a.causal), op, "masks and causal need the softmax axis to be the last");
  check(a.nq >= 1 && a.outer % a.nq == 0, op, "rows must be a multiple of nq");
  check(!a.mask.ptr || (a.mask.d1 >= 1 && (a.outer / a.nq) % a.mask.d1 == 0), op, "mask d1 must divide rows / nq");
  dispatch_float(a.x_dtype, op, [&](auto tag) {
    using TI = typename decltype(tag)::type;
    dispatch_out<TI>(a.y_dtype, op, [&](auto otag) {
      using TO = typename decltype(otag)::type;
      constexpr int V = VecWidth<TI>::value;
      if (a.inner > 1) {
        const StridedPlan sp = plan_strided(a.C, a.inner);
        const StridedFwdParams<TI, TO> p{static_cast<const TI*>(a.x), a.x_s0, a.x_s1, static_cast<TO*>(a.y), a.outer,
                                         a.inner, static_cast<int>(a.C), sp.tx, sp.itiles, sp.in_regs};
        auto k = softmax_fwd_strided_kernel<TI, TO, kElems>;
        FTFM_LAUNCH(k, grid_size(a.outer * sp.itiles), kStridedThreads, 0, stream, p);
        return;
      }
      const int64_t x_stride = a.outer == 1 ? a.C : a.x_s0;  // one row: the stride is unused
      const SoftmaxMask& m = a.mask;
      const size_t msize = m.is_bool ? 1 : sizeof(TI);
      const bool mask_vec = m.ptr && m.sk == 1 && m.s0 % V == 0 && m.s1 % V == 0 && m.sq % V == 0 &&
                            (reinterpret_cast<uintptr_t>(m.ptr) % (V * msize)) == 0;
      FwdParams<TI, TO> p{static_cast<const TI*>(a.x), x_stride, static_cast<TO*>(a.y),
                          common(a.outer, a.C, a.nq, a.scale, a.causal, a.workspace), m, mask_vec, a.zero_empty};
      const bool vec = a.C % V == 0 && x_stride % V == 0 && aligned16(a.x) && aligned16(a.y);
      const RowPlan plan = plan_rows(a.outer, a.C, a.mask.ptr ? 4 : sizeof(TI), kFwdMaxThreads * fwd_elems(vec ? V : 1));
      check(plan.path != Path::Split || a.workspace, op, "this shape needs a workspace (softmax_workspace_floats)");
      vec ? fwd_launch<TI, TO, V>(p, plan, stream) : fwd_launch<TI, TO, 1>(p, plan, stream);
    });
  });
}

void bwd(const SoftmaxBwdArgs& a, void* stream) {
  const char* op = "softmax_bwd";
  check_shape(op, a.outer, a.C, a.inner);
  if (a.outer == 0 || a.C == 0) return;
  check(a.y && a.dy && a.dx, op, "y, dy and dx must be non-null");
  check(a.inner == 1 || !a.causal, op, "causal needs the softmax axis to be the last");
  check(a.nq >= 1 && a.outer % a.nq == 0, op, "rows must be a multiple of nq");
  dispatch_float(a.dx_dtype, op, [&](auto tag) {
    using TX = typename decltype(tag)::type;
    dispatch_out<TX>(a.y_dtype, op, [&](auto ytag) {
      using TY = typename decltype(ytag)::type;
      constexpr int V = VecWidth<TY>::value;
      if (a.inner > 1) {
        const StridedPlan sp = plan_strided(a.C, a.inner);
        const StridedBwdParams<TY, TX> p{static_cast<const TY*>(a.y), a.y_s0, a.y_s1, static_cast<const TY*>(a.dy),
                                         a.dy_s0, a.dy_s1, static_cast<TX*>(a.dx), a.outer, a.inner,
                                         static_cast<int>(a.C), a.scale, sp.tx, sp.itiles, sp.in_regs};
        auto k = softmax_bwd_strided_kernel<TY, TX, kElems>;
        FTFM_LAUNCH(k, grid_size(a.outer * sp.itiles), kStridedThreads, 0, stream, p);
        return;
      }
      const int64_t y_stride = a.outer == 1 ? a.C : a.y_s0, dy_stride = a.outer == 1 ? a.C : a.dy_s0;
      const RowPlan plan = plan_rows(a.outer, a.C, 2 * sizeof(TY), kBwdMaxThreads * kElems);
      check(plan.path != Path::Split || a.workspace, op, "this shape needs a workspace (softmax_workspace_floats)");
      BwdParams<TY, TX> p{static_cast<const TY*>(a.y), y_stride, static_cast<const TY*>(a.dy), dy_stride,
                          static_cast<TX*>(a.dx), common(a.outer, a.C, a.nq, a.scale, a.causal, a.workspace)};
      const bool vec = a.C % V == 0 && y_stride % V == 0 && dy_stride % V == 0 && aligned16(a.y) && aligned16(a.dy) &&
                       aligned16(a.dx);
      vec ? bwd_launch<TY, TX, V>(p, plan, stream) : bwd_launch<TY, TX, 1>(p, plan, stream);
    });
  });
}

}  // namespace
}  // namespace softmax_impl

int64_t softmax_workspace_floats(int64_t outer, int64_t C, int64_t inner, DType dtype, bool masked, bool backward) {
  return softmax_impl::workspace_floats(outer, C, inner, dtype, masked, backward);
}
void softmax_fwd(const SoftmaxFwdArgs& args, void* stream) { softmax_impl::fwd(args, stream); }
void softmax_bwd(const SoftmaxBwdArgs& args, void* stream) { softmax_impl::bwd(args, stream); }

}  // namespace ftfm

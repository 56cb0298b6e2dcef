// Label-smoothed cross-entropy with optional class weights and z-loss, forward and backward
// (launcher API: include/launchers.h, section cross_entropy.cu).
//
// Shapes: logits x [rows, cols] (row stride given, classes contiguous), target [rows] int64,
// class weights w [cols] fp32 (optional) with their sum W [1] fp32 (device scalar, no host read);
// outputs loss [rows] and lse [rows] fp32; the backward writes dx [rows, cols] (own row stride; may
// be x itself for the in-place use by the fused linear + cross-entropy). All math in fp32.
//
// One loss for both smoothing conventions, with coefficients chosen by the caller:
//   L_r = a * w_y * (lse - x_y) + b * (W * lse - sum_c w_c x_c) + z * lse^2      (w = 1, W = cols unweighted)
//   torch   (F.cross_entropy, label_smoothing=eps): a = 1 - eps,             b = eps / C
//   fairseq (eps_i = eps / (C - 1)):                a = 1 - eps - eps / (C-1), b = eps / (C - 1)
//   dL_r/dx_c = p_c * (a w_y + b W + 2 z lse) - b w_c - a w_y [c == y],   p_c = exp(x_c - lse)
// Logit softcapping (Gemma 2's final_logit_softcapping, cap > 0; 0 = off): every x above is
// cap * tanh(x / cap) of the stored logit, and the gradient is multiplied by 1 - tanh^2(x / cap).
// Rows whose target equals ignore_index have loss 0, lse 0 and a zero gradient, and are not read.
// A target outside [0, cols) (and not ignore_index) gives loss = lse = NaN and a NaN gradient row:
// no device assert and no host synchronization (the CPU kernel raises instead; see bindings.cpp).
// The backward takes a per-row fp32 gradient `dloss` with a stride (0 broadcasts one scalar), so one
// kernel serves reduction none/sum/mean: the Python op passes autograd's gradient of the row losses.
//
// Performance intent (H100 SXM, ~3.0 TB/s measured copy). Minimum traffic: forward reads the logits
// once (+ 16 B per row); backward reads them once and writes dx once: fwd+bwd = 3 x rows x cols x
// element size, e.g. 4096 x 131072 bf16 = 3 GiB -> ~1.07 ms floor. Target >= 85% of copy bandwidth.
//   * Forward: one row per group of tpr threads (tpr <= 32: several rows per 128-thread block, shuffles
//     only; else one row per block of up to 512 threads); each thread walks the row once with 16-byte
//     loads, kUnroll vectors in flight, keeping an online (max, sum exp(x - max), sum of logits) that
//     is rescaled once per kUnroll vectors; one block reduction per row merges the triples.
//   * Rows are read in place whatever their alignment: a per-row scalar head up to the first 16-byte
//     boundary, aligned 16-byte body, scalar tail (so odd vocabularies like 50257 stay vectorized).
//   * Backward: no reduction, so long rows are also split across blockIdx.y when there are few rows;
//     the body is vectorized when x and dx rows share their 16-byte misalignment, else VEC = 1.
//   * int64 row offsets everywhere (rows x cols may exceed 2^31); column indices are int (cols < 2^31).
#include "include/ftfm_cuda.h"
#include "include/launchers.h"
#include "include/dispatch.cuh"
#include "include/reduce.cuh"
#include "include/vec.cuh"

#include <algorithm>
#include <climits>

namespace ftfm {
// A named namespace (not an anonymous one): the emulator build includes every .cu into one translation
// unit, so helpers of different kernel files must not collide.
namespace ce {

constexpr int kMaxThreads = 512;  // threads per row (one row per block above 32)
constexpr int kSmallBlock = 128;  // block size when several rows share a block
constexpr int kPerThread = 16;    // target 16-byte vectors per thread per row when choosing tpr
constexpr int kUnroll = 4;        // vectors loaded before they are used (memory-level parallelism)
// The backward keeps 16 elements per thread in flight (4 x fp32 or 2 x fp16/bf16 vectors): with 4
// bf16 vectors it needs more than the 64 registers that two 512-thread blocks per SM allow.
template <typename T>
constexpr int bwd_unroll() { return sizeof(T) == 2 ? 2 : 4; }

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// Online log-sum-exp state of a set of logits: m = max, s = sum exp(x - m), sx = sum of (weighted)
// logits. The empty set is {-inf, 0, 0}. A set whose max is -inf has s = 0.
struct LseAcc {
  float m, s, sx;
};

// Merge of two disjoint sets. __fmul_rn/__fadd_rn keep nvcc from contracting into FMAs in an
// operand-order-dependent way, so merge(a, b) == merge(b, a) bitwise (reduce.cuh's requirement).
__device__ __forceinline__ LseAcc lse_merge(const LseAcc& a, const LseAcc& b) {
  const float m = fmaxf(a.m, b.m);
  const float s = m == -INFINITY ? 0.f : __fadd_rn(__fmul_rn(a.s, __expf(a.m - m)), __fmul_rn(b.s, __expf(b.m - m)));
  return LseAcc{m, s, __fadd_rn(a.sx, b.sx)};
}
__device__ __forceinline__ LseAcc shfl_xor(const LseAcc& v, int mask) {  // found by ADL from reduce.cuh
  return LseAcc{ftfm::shfl_xor(v.m, mask), ftfm::shfl_xor(v.s, mask), ftfm::shfl_xor(v.sx, mask)};
}
struct LseOp {
  __device__ __forceinline__ LseAcc operator()(const LseAcc& x, const LseAcc& y) const { return lse_merge(x, y); }
  template <typename V>
  __device__ __forceinline__ static V identity() { return LseAcc{-INFINITY, 0.f, 0.f}; }
};

// Elements before the first 16-byte boundary of a row starting at p (0 when VEC == 1).
template <typename T, int VEC>
__device__ __forceinline__ int head_elems(const T* p, int cols) {
  if (VEC == 1) return 0;
  const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % VEC);
  return mis ? min(VEC - mis, cols) : 0;
}

template <typename T>
struct FwdParams {
  const T* x; int64_t x_stride; const int64_t* target; const float* w; const float* wsum;
  float* loss; float* lse; int64_t rows; int cols; int64_t ignore_index; float a, b, z;
  float cap, inv_cap;  // softcap (0 = off) and 1 / cap
  int tpr;  // threads per row
};

template <typename T>
struct BwdParams {
  const float* dloss; int64_t dloss_stride; const T* x; int64_t x_stride; const int64_t* target; const float* w;
  const float* wsum; const float* lse; T* dx; int64_t dx_stride; int64_t rows; int cols; int64_t ignore_index;
  float a, b, z; float cap, inv_cap; int tpr;
};

// tanh under --use_fast_math, where tanhf becomes MUFU.TANH (tanh.approx, relative error ~2^-11: the
// H200 run measured dlogits 1e-5 off in fp32, 300x torch's error). 1 - 2 / (e^{2|x|} + 1) with x's
// sign: absolute error ~1e-7 everywhere (relative near 0 is worse, but the loss only sees cap * tanh
// through a softmax, where the absolute error of a logit is what counts). A Taylor branch for small
// |x| or an expm1f form was more accurate near 0 but spilled the bf16 forward on sm_90.
__device__ __forceinline__ float tanh_accurate(float x) {
  const float r = 1.f - 2.f / (__expf(2.f * fabsf(x)) + 1.f);  // e^{2|x|} = inf past ~44: exactly 1
  return copysignf(r, x);
}

// The logit the loss sees: cap * tanh(x / cap) with softcapping, else x (a uniform branch).
__device__ __forceinline__ float capped(float x, float cap, float inv_cap) {
  return cap != 0.f ? cap * tanh_accurate(x * inv_cap) : x;
}

// This thread's share (lane of tpr) of one row: online max / sum-exp / sum of (weighted) logits.
template <typename T, int VEC, bool WEIGHTED>
__device__ __forceinline__ LseAcc row_scan(const T* xr, int cols, const float* w, int lane, int tpr, float cap,
                                           float inv_cap) {
  LseAcc acc{-INFINITY, 0.f, 0.f};
  const int head = head_elems<T, VEC>(xr, cols), nvec = (cols - head) / VEC, tail0 = head + nvec * VEC;
  // -- scalar head and tail (< VEC elements each)
  for (int c = lane; c < head; c += tpr) {
    const float f = capped(to_float(xr[c]), cap, inv_cap);
    acc = lse_merge(acc, LseAcc{f, 1.f, WEIGHTED ? f * __ldg(w + c) : f});
  }
  for (int c = tail0 + lane; c < cols; c += tpr) {
    const float f = capped(to_float(xr[c]), cap, inv_cap);
    acc = lse_merge(acc, LseAcc{f, 1.f, WEIGHTED ? f * __ldg(w + c) : f});
  }
  // -- aligned body: kUnroll vectors per iteration, one rescale of the running sum per iteration
  const T* xb = xr + head;
  for (int v0 = 0; v0 < nvec; v0 += tpr * kUnroll) {
    Vec<T, VEC> buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * tpr + lane;
      if (v < nvec) buf[u] = load_vec<VEC>(xb + static_cast<int64_t>(v) * VEC);
    }
    float cmax = -INFINITY;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * tpr + lane;
      if (v >= nvec) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = capped(to_float(buf[u].v[j]), cap, inv_cap);
        cmax = fmaxf(cmax, f);
        acc.sx += WEIGHTED ? f * __ldg(w + head + v * VEC + j) : f;
      }
    }
    const float m = fmaxf(acc.m, cmax);
    if (m == -INFINITY) continue;  // nothing finite yet: s stays 0
    float s = acc.s * __expf(acc.m - m);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * tpr + lane;
      if (v >= nvec) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += __expf(capped(to_float(buf[u].v[j]), cap, inv_cap) - m);
    }
    acc.m = m;
    acc.s = s;
  }
  return acc;
}

// ---- forward: grid-stride over blocks of rpb = blockDim.x / tpr rows ---------------------------------
template <typename T, int VEC, bool WEIGHTED>
__global__ void __launch_bounds__(kMaxThreads, 2) cross_entropy_fwd_kernel(FwdParams<T> p) {
  __shared__ LseAcc red_smem[64];
  const int tpr = p.tpr, lane = static_cast<int>(threadIdx.x) % tpr, rpb = static_cast<int>(blockDim.x) / tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  GroupReducer<LseAcc> red(red_smem, tpr);
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < p.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t row = base + group;
    const bool valid = row < p.rows;
    const int64_t tgt = valid ? p.target[row] : p.ignore_index;
    const bool active = valid && tgt != p.ignore_index;  // ignored rows are not read
    const T* xr = p.x + (valid ? row : 0) * p.x_stride;
    LseAcc acc{-INFINITY, 0.f, 0.f};
    if (active) acc = row_scan<T, VEC, WEIGHTED>(xr, p.cols, p.w, lane, tpr, p.cap, p.inv_cap);
    acc = red.allreduce(acc, LseOp());  // every thread of the group joins
    if (!valid || lane != 0) continue;
    float loss = 0.f, lse = 0.f;
    if (active) {
      lse = acc.m + __logf(acc.s);
      if (tgt < 0 || tgt >= p.cols || isnan(acc.sx)) {
        loss = lse = nan_f();  // bad target (documented), or NaN logits
      } else {
        const float wt = WEIGHTED ? p.w[tgt] : 1.f;
        const float wsum = WEIGHTED ? *p.wsum : static_cast<float>(p.cols);
        loss = p.a * wt * (lse - capped(to_float(xr[tgt]), p.cap, p.inv_cap));
        if (p.b != 0.f) loss += p.b * (wsum * lse - acc.sx);
        if (p.z != 0.f) loss += p.z * lse * lse;
      }
    }
    p.loss[row] = loss;
    p.lse[row] = lse;
  }
}

// dx for one vector (or element) of a row: coef * exp(y - lse) - bg * w_c - [c == tgt] * tg with y the
// (capped) logit, times 1 - (y / cap)^2 with softcapping.
template <typename T, int N, bool WEIGHTED>
__device__ __forceinline__ Vec<T, N> grad_vec(const Vec<T, N>& x, int c, int64_t tgt, float lse, float coef, float bg,
                                              float tg, const float* w, float cap, float inv_cap) {
  Vec<T, N> out;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float y = capped(to_float(x.v[j]), cap, inv_cap);
    float g = coef * __expf(y - lse) - (WEIGHTED ? bg * __ldg(w + c + j) : bg);
    if (c + j == tgt) g -= tg;
    if (cap != 0.f) {
      const float t = y * inv_cap;
      g *= 1.f - t * t;
    }
    out.v[j] = from_float<T>(g);
  }
  return out;
}

// ---- backward: blockIdx.x grid-strides over row blocks, blockIdx.y splits each row's body ----------
template <typename T, int VEC, bool WEIGHTED>
__global__ void __launch_bounds__(kMaxThreads, 2) cross_entropy_bwd_kernel(BwdParams<T> p) {
  const int tpr = p.tpr, lane = static_cast<int>(threadIdx.x) % tpr, rpb = static_cast<int>(blockDim.x) / tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  const int split = static_cast<int>(blockIdx.y), splits = static_cast<int>(gridDim.y);
  for (int64_t base = int64_t(blockIdx.x) * rpb; base < p.rows; base += int64_t(gridDim.x) * rpb) {
    const int64_t row = base + group;
    if (row >= p.rows) continue;  // no barriers in this kernel
    const T* xr = p.x + row * p.x_stride;
    T* dxr = p.dx + row * p.dx_stride;
    const int64_t tgt = p.target[row];
    const int head = head_elems<T, VEC>(xr, p.cols), nvec = (p.cols - head) / VEC, tail0 = head + nvec * VEC;
    // this split's share of the body vectors
    const int per = (nvec + splits - 1) / splits, v_begin = min(nvec, split * per), v_end = min(nvec, v_begin + per);
    if (tgt == p.ignore_index || tgt < 0 || tgt >= p.cols) {  // ignored: zeros; bad target: NaN
      const float fill = tgt == p.ignore_index ? 0.f : nan_f();
      if (split == 0) {
        for (int c = lane; c < head; c += tpr) dxr[c] = from_float<T>(fill);
        for (int c = tail0 + lane; c < p.cols; c += tpr) dxr[c] = from_float<T>(fill);
      }
      for (int v = v_begin + lane; v < v_end; v += tpr)
        store_vec(dxr + head + static_cast<int64_t>(v) * VEC, fill_vec<T, VEC>(fill));
      continue;
    }
    const float g = p.dloss[row * p.dloss_stride], lse = p.lse[row];
    const float wt = WEIGHTED ? p.w[tgt] : 1.f, wsum = WEIGHTED ? *p.wsum : static_cast<float>(p.cols);
    const float coef = g * (p.a * wt + p.b * wsum + 2.f * p.z * lse), bg = g * p.b, tg = g * p.a * wt;
    if (split == 0) {
      for (int c = lane; c < head; c += tpr) {
        Vec<T, 1> x1{{xr[c]}};
        dxr[c] = grad_vec<T, 1, WEIGHTED>(x1, c, tgt, lse, coef, bg, tg, p.w, p.cap, p.inv_cap).v[0];
      }
      for (int c = tail0 + lane; c < p.cols; c += tpr) {
        Vec<T, 1> x1{{xr[c]}};
        dxr[c] = grad_vec<T, 1, WEIGHTED>(x1, c, tgt, lse, coef, bg, tg, p.w, p.cap, p.inv_cap).v[0];
      }
    }
    constexpr int U = bwd_unroll<T>();
    for (int v0 = v_begin; v0 < v_end; v0 += tpr * U) {
      Vec<T, VEC> buf[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // all loads first: dx may alias x (in-place use)
        const int v = v0 + u * tpr + lane;
        if (v < v_end) buf[u] = load_vec<VEC>(xr + head + static_cast<int64_t>(v) * VEC);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + u * tpr + lane;
        if (v >= v_end) continue;
        const int c = head + v * VEC;
        store_vec(dxr + c, grad_vec<T, VEC, WEIGHTED>(buf[u], c, tgt, lse, coef, bg, tg, p.w, p.cap, p.inv_cap));
      }
    }
  }
}

// ---- host side ----------------------------------------------------------------------------------------
void check(bool ok, const char* op, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("fasttfm: ") + op + ": " + what);
}

// Threads per row: enough that each holds ~kPerThread vectors, a power of two up to 32 or a multiple
// of 32 up to kMaxThreads (both valid group widths for GroupReducer).
template <int VEC>
int threads_per_row(int cols) {
  return std::min(kMaxThreads, group_width((cols + VEC - 1) / VEC, kPerThread));
}

template <typename T, int VEC, bool WEIGHTED>
void fwd_launch(FwdParams<T> p, void* stream) {
  (void)stream;
  p.tpr = threads_per_row<VEC>(p.cols);
  const int rpb = p.tpr < kSmallBlock ? kSmallBlock / p.tpr : 1;
  auto k = cross_entropy_fwd_kernel<T, VEC, WEIGHTED>;
  FTFM_LAUNCH(k, grid_size((p.rows + rpb - 1) / rpb), rpb * p.tpr, 0, stream, p);
}

template <typename T, int VEC, bool WEIGHTED>
void bwd_launch(BwdParams<T> p, void* stream) {
  (void)stream;
  p.tpr = threads_per_row<VEC>(p.cols);
  const int rpb = p.tpr < kSmallBlock ? kSmallBlock / p.tpr : 1;
  const int64_t row_blocks = (p.rows + rpb - 1) / rpb;
  // Few long rows: split each row's body over blockIdx.y so ~2048 blocks run (each split keeps at
  // least one full unrolled iteration of work).
  const int64_t body_iters = std::max<int64_t>(1, p.cols / VEC / (int64_t(p.tpr) * bwd_unroll<T>()));
  const int64_t splits =
      rpb > 1 ? 1 : std::clamp<int64_t>((2048 + row_blocks - 1) / row_blocks, 1, std::min<int64_t>(body_iters, 2048));
  auto k = cross_entropy_bwd_kernel<T, VEC, WEIGHTED>;
  FTFM_LAUNCH(k, dim3(grid_size(row_blocks), static_cast<unsigned>(splits)), rpb * p.tpr, 0, stream, p);
}

bool elem_aligned(const void* ptr, size_t size) { return reinterpret_cast<uintptr_t>(ptr) % size == 0; }

}  // namespace ce

void cross_entropy_fwd(const void* logits, int64_t row_stride, const int64_t* target, const float* weight,
                       const float* weight_sum, float* loss, float* lse, int64_t rows, int64_t cols,
                       int64_t ignore_index, float a, float b, float z, float softcap, DType dtype, void* stream) {
  const char* op = "cross_entropy_fwd";
  ce::check(rows >= 0 && cols >= 1 && cols <= INT_MAX, op, "rows must be >= 0 and cols in [1, 2^31)");
  if (rows == 0) return;
  ce::check(logits && target && loss && lse && (!weight || weight_sum), op,
            "logits, target, loss, lse (and weight_sum with weight) must be non-null");
  if (rows == 1) row_stride = cols;
  dispatch_float(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = VecWidth<T>::value;
    const ce::FwdParams<T> p{static_cast<const T*>(logits), row_stride, target, weight, weight_sum, loss, lse,
                             rows, static_cast<int>(cols), ignore_index, a, b, z, softcap,
                             softcap != 0.f ? 1.f / softcap : 0.f, 0};
    const bool vec = ce::elem_aligned(logits, sizeof(T));  // rows are read in place at any 16-byte offset
    if (weight) {
      vec ? ce::fwd_launch<T, V, true>(p, stream) : ce::fwd_launch<T, 1, true>(p, stream);
    } else {
      vec ? ce::fwd_launch<T, V, false>(p, stream) : ce::fwd_launch<T, 1, false>(p, stream);
    }
  });
}

void cross_entropy_bwd(const float* dloss, int64_t dloss_stride, const void* logits, int64_t row_stride,
                       const int64_t* target, const float* weight, const float* weight_sum, const float* lse,
                       void* dlogits, int64_t dlogits_stride, int64_t rows, int64_t cols, int64_t ignore_index,
                       float a, float b, float z, float softcap, DType dtype, void* stream) {
  const char* op = "cross_entropy_bwd";
  ce::check(rows >= 0 && cols >= 1 && cols <= INT_MAX, op, "rows must be >= 0 and cols in [1, 2^31)");
  if (rows == 0) return;
  ce::check(dloss && logits && target && lse && dlogits && (!weight || weight_sum), op,
            "dloss, logits, target, lse, dlogits (and weight_sum with weight) must be non-null");
  if (rows == 1) row_stride = dlogits_stride = cols;
  dispatch_float(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = VecWidth<T>::value;
    const ce::BwdParams<T> p{dloss, dloss_stride, static_cast<const T*>(logits), row_stride, target, weight,
                             weight_sum, lse, static_cast<T*>(dlogits), dlogits_stride, rows,
                             static_cast<int>(cols), ignore_index, a, b, z, softcap,
                             softcap != 0.f ? 1.f / softcap : 0.f, 0};
    // Vector body only when every x row and its dx row sit at the same offset from a 16-byte boundary.
    const auto xa = reinterpret_cast<uintptr_t>(logits), da = reinterpret_cast<uintptr_t>(dlogits);
    const bool vec = ce::elem_aligned(logits, sizeof(T)) && ce::elem_aligned(dlogits, sizeof(T)) &&
                     (xa - da) % 16 == 0 && ((row_stride - dlogits_stride) * int64_t(sizeof(T))) % 16 == 0;
    if (weight) {
      vec ? ce::bwd_launch<T, V, true>(p, stream) : ce::bwd_launch<T, 1, true>(p, stream);
    } else {
      vec ? ce::bwd_launch<T, V, false>(p, stream) : ce::bwd_launch<T, 1, false>(p, stream);
    }
  });
}

}  // namespace ftfm

// Fused softmax: any axis, scaled / masked / causal, forward and backward (API: include/launchers.h).
// This file: the design, path planning and the launchers. Kernels: softmax_fwd.cuh, softmax_bwd.cuh
// (last axis) and softmax_strided.cuh (other axes).
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

#include "softmax_fwd.cuh"      // last axis, forward kernels
#include "softmax_bwd.cuh"      // last axis, backward kernels
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

// The same three paths as fwd_launch, not folded: other kernels and ITERS per path, and a kernel-traits
// template to share the 15 lines would be longer than they are.
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

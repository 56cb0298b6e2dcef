// The only file that sees torch tensors: argument checks, device guards, dtype mapping and
// op registration. Kernels and launchers (csrc/*.cu) take raw pointers and sizes.
//
// Built twice:
//  * into fasttfm._C (library `fasttfm_C`): CUDA tensors -> the nvcc-built kernels (when built
//    with FASTTFM_WITH_CUDA), plus the CPU kernels of csrc/cpu/;
//  * into fasttfm._C_emu (library `fasttfm_emu`, FASTTFM_EMU defined, via csrc/emu/bindings_emu.cpp):
//    CPU tensors -> the same .cu kernels compiled by g++ against the SIMT emulator.
// The user-facing ops (`fasttfm::...`, with fake impls and autograd) are registered in Python
// (fasttfm/ops/), which calls these low-level ops.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "include/launchers.h"

#if defined(FASTTFM_WITH_CUDA) && !defined(FASTTFM_EMU)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FTFM_KERNELS 1
#define FTFM_LIB fasttfm_C
#elif defined(FASTTFM_EMU)
#define FTFM_KERNELS 1
#define FTFM_LIB fasttfm_emu
#else
#define FTFM_LIB fasttfm_C
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Where a binding's kernels run: the CUDA kernels (fasttfm._C with CUDA), the same kernels in the
// SIMT emulator (fasttfm._C_emu, CPU tensors), or the CPU C++ kernels of csrc/cpu (fasttfm._C).
enum class Target { Gpu, Cpu };

#if defined(FASTTFM_EMU)
constexpr const char* kGpuDevice = "cpu";  // the emulator runs the GPU kernels on CPU tensors
#else
constexpr const char* kGpuDevice = "cuda";
#endif

bool on_device(const Tensor& t, Target target) {
#if defined(FASTTFM_EMU)
  (void)target;
  return t.device().is_cpu();
#else
  return target == Target::Gpu ? t.device().is_cuda() : t.device().is_cpu();
#endif
}

void check_tensor(const Tensor& t, const char* name, Target target) {
  TORCH_CHECK(on_device(t, target), "fasttfm: ", name, " must be a ", target == Target::Gpu ? kGpuDevice : "cpu",
              " tensor, got ", t.device());
}

ftfm::DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ftfm::DType::F32;
    case at::kHalf: return ftfm::DType::F16;
    case at::kBFloat16: return ftfm::DType::BF16;
    default:
      TORCH_CHECK(false, "fasttfm: ", name, " dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

[[maybe_unused]] void* stream_of(const Tensor& t) {
#if defined(FTFM_KERNELS) && !defined(FASTTFM_EMU)
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#else
  (void)t;
  return nullptr;
#endif
}

// Sets the current CUDA device to the tensor's for GPU targets (cuda:1 inputs run on cuda:1).
struct DeviceGuard {
#if defined(FTFM_KERNELS) && !defined(FASTTFM_EMU)
  std::optional<c10::cuda::CUDAGuard> guard;
  DeviceGuard(const Tensor& t, Target target) {
    if (target == Target::Gpu) guard.emplace(t.device());
  }
#else
  DeviceGuard(const Tensor&, Target) {}
#endif
};

// A [rows, cols] view with unit column stride; the row stride may differ from cols.
void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "fasttfm: ", name, " must be 2-D [rows, cols], got ", t.dim(), "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fasttfm: ", name, " must have unit column stride");
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), "fasttfm: ", name, " rows must not overlap");
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

const void* opt_ptr(const OptTensor& t) { return present(t) ? t->data_ptr() : nullptr; }

// The checks every backward makes of its incoming gradient against the tensor it differentiates.
void check_same_shape_dtype(const Tensor& grad, const char* grad_name, const Tensor& t, const char* name) {
  TORCH_CHECK(grad.sizes() == t.sizes(), "fasttfm: ", grad_name, " shape ", grad.sizes(), " != ", name, " shape ",
              t.sizes());
  TORCH_CHECK(grad.scalar_type() == t.scalar_type(), "fasttfm: ", grad_name, " dtype must equal the ", name, "'s");
}

// An fp32 scratch buffer of `floats` elements on `like`'s device, kept alive by `holder` (nullptr when empty).
[[maybe_unused]] float* workspace(Tensor& holder, int64_t floats, const Tensor& like) {
  holder = at::empty({floats}, like.options().dtype(at::kFloat));
  return floats ? holder.data_ptr<float>() : nullptr;
}

// ---- layer_norm / rms_norm ------------------------------------------------------------------

// weight/bias checked and returned contiguous: a strided or expanded parameter is copied (a 1-D copy
// costs nothing next to the op), as torch accepts any strides there.
OptTensor affine_arg(const OptTensor& p, const Tensor& x, const char* name, at::ScalarType w_type, Target target) {
  if (!present(p)) return std::nullopt;
  check_tensor(*p, name, target);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "fasttfm: ", name, " must be a 1-D tensor of ", x.size(1),
              " elements (the row width), got shape ", p->sizes());
  TORCH_CHECK(p->scalar_type() == w_type, "fasttfm: weight and bias must have the same dtype, got ", name, " ",
              p->scalar_type(), " and ", w_type);
  TORCH_CHECK(w_type == x.scalar_type() || w_type == at::kFloat, "fasttfm: ", name, " dtype must equal the input's (",
              x.scalar_type(), ") or be float32, got ", w_type);
  return p->contiguous();
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight_arg,
                                                  const OptTensor& bias_arg, double eps, bool rms, Target target) {
  check_tensor(x, "input", target);
  check_rows(x, "input");
  DeviceGuard guard(x, target);
  const auto w_type = weight_arg.has_value() ? weight_arg->scalar_type()
                                             : (bias_arg.has_value() ? bias_arg->scalar_type() : x.scalar_type());
  const OptTensor weight = affine_arg(weight_arg, x, "weight", w_type, target);
  const OptTensor bias = affine_arg(bias_arg, x, "bias", w_type, target);
  const int64_t rows = x.size(0), cols = x.size(1);
  auto stat_opts = x.options().dtype(at::kFloat);
  Tensor y = at::empty({rows, cols}, x.options());
  Tensor mean = at::empty({rms ? 0 : rows}, stat_opts);
  Tensor rstd = at::empty({rows}, stat_opts);
  if (rows == 0 || cols == 0) return {y, mean, rstd};
  const auto xd = to_dtype(x, "input");
  const auto wd = w_type == at::kFloat ? ftfm::DType::F32 : xd;
  float* mean_ptr = rms ? nullptr : mean.data_ptr<float>();
#ifdef FTFM_KERNELS
  if (target == Target::Gpu) {
    ftfm::layer_norm_fwd(x.data_ptr(), x.stride(0), opt_ptr(weight), opt_ptr(bias), y.data_ptr(), mean_ptr,
                         rstd.data_ptr<float>(), rows, cols, static_cast<float>(eps), rms, xd, wd, stream_of(x));
    return {y, mean, rstd};
  }
#endif
#ifndef FASTTFM_EMU
  ftfm::layer_norm_fwd_cpu(x.data_ptr(), x.stride(0), opt_ptr(weight), opt_ptr(bias), y.data_ptr(), mean_ptr,
                           rstd.data_ptr<float>(), rows, cols, static_cast<float>(eps), rms, xd, wd);
#endif
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x, const OptTensor& weight_arg,
                                                  const Tensor& mean, const Tensor& rstd, bool rms, bool need_dweight,
                                                  bool need_dbias, Target target) {
  check_tensor(dy, "grad_output", target);
  check_tensor(x, "input", target);
  check_rows(dy, "grad_output");
  check_rows(x, "input");
  check_same_shape_dtype(dy, "grad_output", x, "input");
  DeviceGuard guard(x, target);
  const auto w_type = weight_arg.has_value() ? weight_arg->scalar_type() : x.scalar_type();
  const OptTensor weight = affine_arg(weight_arg, x, "weight", w_type, target);
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows && (rms || mean.numel() == rows),
              "fasttfm: saved statistics must be float32 [rows]");
  need_dweight = need_dweight && weight.has_value();
  auto w_opts = x.options().dtype(w_type);
  Tensor dx = at::empty({rows, cols}, x.options());
  Tensor dweight = at::empty({need_dweight ? cols : 0}, w_opts);
  Tensor dbias = at::empty({need_dbias ? cols : 0}, w_opts);
  if (cols == 0) return {dx, dweight, dbias};
  if (rows == 0) {  // no rows: the parameter gradients are exact zeros
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const auto xd = to_dtype(x, "input");
  const auto wd = w_type == at::kFloat ? ftfm::DType::F32 : xd;
  const float* mean_ptr = rms ? nullptr : mean.data_ptr<float>();
  void* dw_ptr = need_dweight ? dweight.data_ptr() : nullptr;
  void* db_ptr = need_dbias ? dbias.data_ptr() : nullptr;
#ifdef FTFM_KERNELS
  if (target == Target::Gpu) {
    Tensor partial;
    float* dw_part = nullptr;
    float* db_part = nullptr;
    if (need_dweight || need_dbias) {
      const int64_t parts = ftfm::layer_norm_bwd_parts(rows, cols);
      partial = at::empty({2, parts, cols}, x.options().dtype(at::kFloat));
      dw_part = partial.data_ptr<float>();
      db_part = dw_part + parts * cols;
    }
    ftfm::layer_norm_bwd(dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), opt_ptr(weight), mean_ptr,
                         rstd.data_ptr<float>(), dx.data_ptr(), need_dweight ? dw_part : nullptr,
                         need_dbias ? db_part : nullptr, dw_ptr, db_ptr, rows, cols, rms, xd, wd, stream_of(x));
    return {dx, dweight, dbias};
  }
#endif
#ifndef FASTTFM_EMU
  ftfm::layer_norm_bwd_cpu(dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), opt_ptr(weight), mean_ptr,
                           rstd.data_ptr<float>(), dx.data_ptr(), dw_ptr, db_ptr, rows, cols, rms, xd, wd);
#endif
  return {dx, dweight, dbias};
}

// ---- cross_entropy (cross-entropy section: csrc/cross_entropy.cu, csrc/cpu/cross_entropy_cpu.cpp) -------
// logits [rows, classes] (class stride 1, any row stride >= 0), target [rows] int64 contiguous, weight
// [classes] fp32 contiguous or None. Coefficients a, b, z as in launchers.h. The CPU target raises
// IndexError for a target outside [0, classes) that is not ignore_index; the GPU target writes NaN
// for that row (no sync).

void check_ce(const Tensor& logits, const Tensor& target, const OptTensor& weight, Target where) {
  check_tensor(logits, "logits", where);
  check_tensor(target, "target", where);
  TORCH_CHECK(logits.dim() == 2 && (logits.size(1) <= 1 || logits.stride(1) == 1) && logits.stride(0) >= 0,
              "fasttfm: cross_entropy: logits must be 2-D [rows, classes] with unit class stride, got shape ",
              logits.sizes(), " and strides ", logits.strides());
  TORCH_CHECK(logits.size(1) >= 1, "fasttfm: cross_entropy: logits need at least one class");
  TORCH_CHECK(target.scalar_type() == at::kLong, "fasttfm: cross_entropy: target dtype must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.is_contiguous(),
              "fasttfm: cross_entropy: target must be a contiguous 1-D tensor of ", logits.size(0),
              " rows, got shape ", target.sizes());
  if (present(weight)) {
    check_tensor(*weight, "weight", where);
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->dim() == 1 && weight->size(0) == logits.size(1) &&
                    weight->is_contiguous(),
                "fasttfm: cross_entropy: weight must be a contiguous float32 tensor of ", logits.size(1),
                " classes, got ", weight->scalar_type(), " of shape ", weight->sizes());
  }
}

// Per-row gradient: [rows] with any stride (0 broadcasts), or one element; fp32.
int64_t check_dloss(const Tensor& dloss, int64_t rows) {
  TORCH_CHECK(dloss.scalar_type() == at::kFloat, "fasttfm: cross_entropy: grad of the row losses must be float32");
  if (dloss.dim() == 0 || (dloss.dim() == 1 && dloss.size(0) == 1 && rows != 1)) return 0;
  TORCH_CHECK(dloss.dim() == 1 && dloss.size(0) == rows, "fasttfm: cross_entropy: grad of the row losses must have ",
              rows, " elements, got shape ", dloss.sizes());
  return dloss.stride(0);
}

// The class weights as the kernels take them: pointers to the weights and to their sum, a device scalar
// (no host read); both null without weights. `sum` keeps the scalar alive for the launch.
struct ClassWeights {
  Tensor sum;
  const float* w = nullptr;
  const float* wsum = nullptr;
  explicit ClassWeights(const OptTensor& weight) {
    if (!present(weight)) return;
    sum = weight->sum();
    w = weight->data_ptr<float>();
    wsum = sum.data_ptr<float>();
  }
};

[[maybe_unused]] void raise_bad_target(int64_t bad, const Tensor& target, int64_t classes, int64_t ignore_index) {
  if (bad < 0) return;
  TORCH_CHECK_INDEX(false, "fasttfm: cross_entropy: target ", target.data_ptr<int64_t>()[bad], " at row ", bad,
                    " is out of bounds for ", classes, " classes (and is not ignore_index=", ignore_index, ")");
}

std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                                             int64_t ignore_index, double a, double b, double z, double softcap,
                                             Target where) {
  check_ce(logits, target, weight, where);
  DeviceGuard guard(logits, where);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  auto f32 = logits.options().dtype(at::kFloat);
  Tensor loss = at::empty({rows}, f32), lse = at::empty({rows}, f32);
  if (rows == 0) return {loss, lse};
  const ClassWeights cw(weight);
  const float *w = cw.w, *ws = cw.wsum;
  const auto xd = to_dtype(logits, "logits");
  const int64_t* t = target.data_ptr<int64_t>();
#ifdef FTFM_KERNELS
  if (where == Target::Gpu) {
    ftfm::cross_entropy_fwd(logits.data_ptr(), logits.stride(0), t, w, ws, loss.data_ptr<float>(),
                            lse.data_ptr<float>(), rows, cols, ignore_index, static_cast<float>(a),
                            static_cast<float>(b), static_cast<float>(z), static_cast<float>(softcap), xd,
                            stream_of(logits));
    return {loss, lse};
  }
#endif
#ifndef FASTTFM_EMU
  const int64_t bad = ftfm::cross_entropy_fwd_cpu(logits.data_ptr(), logits.stride(0), t, w, ws,
                                                  loss.data_ptr<float>(), lse.data_ptr<float>(), rows, cols,
                                                  ignore_index, static_cast<float>(a), static_cast<float>(b),
                                                  static_cast<float>(z), static_cast<float>(softcap), xd);
  raise_bad_target(bad, target, cols, ignore_index);
#endif
  return {loss, lse};
}

// Writes the gradient into `out` ([rows, classes], unit class stride; may be `logits` itself).
void cross_entropy_bwd_into(const Tensor& dloss, const Tensor& logits, const Tensor& target, const OptTensor& weight,
                            const Tensor& lse, int64_t ignore_index, double a, double b, double z, double softcap,
                            Tensor& out, Target where) {
  check_ce(logits, target, weight, where);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  check_tensor(dloss, "grad", where);
  check_tensor(lse, "lse", where);
  const int64_t ds = check_dloss(dloss, rows);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == rows && lse.is_contiguous(),
              "fasttfm: cross_entropy: saved lse must be a contiguous float32 [rows] tensor");
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type() &&
                  (cols <= 1 || out.stride(1) == 1) && (rows <= 1 || out.stride(0) >= cols),
              "fasttfm: cross_entropy: gradient buffer must match the logits' shape and dtype, with unit class "
              "stride and non-overlapping rows");
  DeviceGuard guard(logits, where);
  if (rows == 0) return;
  const ClassWeights cw(weight);
  const float *w = cw.w, *ws = cw.wsum;
  const auto xd = to_dtype(logits, "logits");
  const int64_t* t = target.data_ptr<int64_t>();
#ifdef FTFM_KERNELS
  if (where == Target::Gpu) {
    ftfm::cross_entropy_bwd(dloss.data_ptr<float>(), ds, logits.data_ptr(), logits.stride(0), t, w, ws,
                            lse.data_ptr<float>(), out.data_ptr(), out.stride(0), rows, cols, ignore_index,
                            static_cast<float>(a), static_cast<float>(b), static_cast<float>(z),
                            static_cast<float>(softcap), xd, stream_of(logits));
    return;
  }
#endif
#ifndef FASTTFM_EMU
  const int64_t bad = ftfm::cross_entropy_bwd_cpu(dloss.data_ptr<float>(), ds, logits.data_ptr(), logits.stride(0), t,
                                                  w, ws, lse.data_ptr<float>(), out.data_ptr(), out.stride(0), rows,
                                                  cols, ignore_index, static_cast<float>(a), static_cast<float>(b),
                                                  static_cast<float>(z), static_cast<float>(softcap), xd);
  raise_bad_target(bad, target, cols, ignore_index);
#endif
}

template <Target T>
std::tuple<Tensor, Tensor> cross_entropy_fwd_on(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                                                int64_t ignore_index, double a, double b, double z, double softcap) {
  return cross_entropy_fwd(logits, target, weight, ignore_index, a, b, z, softcap, T);
}
template <Target T>
Tensor cross_entropy_bwd_on(const Tensor& dloss, const Tensor& logits, const Tensor& target, const OptTensor& weight,
                            const Tensor& lse, int64_t ignore_index, double a, double b, double z, double softcap) {
  Tensor out = at::empty({logits.size(0), logits.size(1)}, logits.options());  // a new buffer, never the input
  cross_entropy_bwd_into(dloss, logits, target, weight, lse, ignore_index, a, b, z, softcap, out, T);
  return out;
}
template <Target T>
void cross_entropy_bwd_inplace_on(Tensor logits, const Tensor& dloss, const Tensor& target, const OptTensor& weight,
                                  const Tensor& lse, int64_t ignore_index, double a, double b, double z,
                                  double softcap) {
  cross_entropy_bwd_into(dloss, logits, target, weight, lse, ignore_index, a, b, z, softcap, logits, T);
}

constexpr const char* kCeFwd = "(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float a, float b, "
                               "float z, float softcap) -> (Tensor, Tensor)";
constexpr const char* kCeBwd = "(Tensor dloss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
                               "int ignore_index, float a, float b, float z, float softcap) -> Tensor";
// Internal (fused linear + cross-entropy): overwrites its own temporary logits with their gradient.
constexpr const char* kCeBwdInplace = "(Tensor(a!) logits, Tensor dloss, Tensor target, Tensor? weight, Tensor lse, "
                                      "int ignore_index, float a, float b, float z, float softcap) -> ()";
// ---- end of the cross-entropy section ---------------------------------------------------------------

#ifdef FASTTFM_EMU
void emu_set_order(int64_t order, int64_t seed) {
  TORCH_CHECK(order >= 0 && order <= 2, "fasttfm: emulator order must be 0 (forward), 1 (reverse) or 2 (random)");
  ftfm::emu_set_order(static_cast<int>(order), static_cast<uint64_t>(seed));
}
#endif

// Registration helpers: the same binding registered for a fixed target.
template <Target T>
std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_on(const Tensor& x, const OptTensor& w, const OptTensor& b,
                                                     double eps, bool rms) {
  return layer_norm_fwd(x, w, b, eps, rms, T);
}
template <Target T>
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_on(const Tensor& dy, const Tensor& x, const OptTensor& w,
                                                     const Tensor& mean, const Tensor& rstd, bool rms, bool need_dw,
                                                     bool need_db) {
  return layer_norm_bwd(dy, x, w, mean, rstd, rms, need_dw, need_db, T);
}

constexpr const char* kLayerNormFwd = "(Tensor x, Tensor? weight, Tensor? bias, float eps, bool rms) -> (Tensor, Tensor, Tensor)";
constexpr const char* kLayerNormBwd = "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool rms, "
                                      "bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor)";


// ==== softmax (csrc/softmax.cu) ===============================================================
// x, y, dy are [outer, C, inner] views (softmax over C): inner == 1 needs unit stride along C,
// inner > 1 unit stride along inner. The op layer (fasttfm/ops/softmax.py) builds these views.
// Forward: GPU target (kernels) and CPU target (csrc/cpu/softmax_cpu.cpp, rows only). Backward: GPU
// target only (the CPU path uses aten's _softmax_backward_data).

void check_softmax_3d(const Tensor& t, const char* name, Target target) {
  check_tensor(t, name, target);
  TORCH_CHECK(t.dim() == 3, "fasttfm: ", name, " must be 3-D [outer, C, inner], got ", t.dim(), "-D");
  if (t.size(2) == 1) {
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fasttfm: ", name, " must have unit stride along the softmax axis");
  } else {
    TORCH_CHECK(t.stride(2) == 1, "fasttfm: ", name, " must have unit stride along the inner axis");
  }
}

int64_t stride_or_0(const Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

void check_nq(int64_t outer, int64_t nq) {
  TORCH_CHECK(nq >= 1 && outer % nq == 0, "fasttfm: softmax rows (", outer, ") must be a multiple of nq (", nq, ")");
}

Tensor softmax_fwd(const Tensor& x, int64_t nq, double scale, const OptTensor& mask, bool causal, bool zero_empty,
                   std::optional<at::ScalarType> dtype, Target target) {
  check_softmax_3d(x, "input", target);
  DeviceGuard guard(x, target);
  const auto out_type = dtype.value_or(x.scalar_type());
  const int64_t outer = x.size(0), C = x.size(1), inner = x.size(2);
  TORCH_CHECK(out_type == x.scalar_type() || out_type == at::kFloat, "fasttfm: softmax output dtype must be the input's (",
              x.scalar_type(), ") or float32, got ", out_type);
  const bool masked = present(mask);
  TORCH_CHECK(inner == 1 || (!masked && !causal), "fasttfm: masks and causal need the softmax axis to be the last");
  TORCH_CHECK(inner == 1 || target == Target::Gpu, "fasttfm: the CPU softmax kernel handles the last axis only");
  check_nq(outer, nq);
  Tensor y = at::empty({outer, C, inner}, x.options().dtype(out_type));
  if (y.numel() == 0) return y;
  ftfm::SoftmaxFwdArgs a;
  a.x = x.data_ptr();
  a.x_s0 = x.stride(0);
  a.x_s1 = x.stride(1);
  a.y = y.data_ptr();
  a.outer = outer;
  a.C = C;
  a.inner = inner;
  a.x_dtype = to_dtype(x, "input");
  a.y_dtype = out_type == at::kFloat ? ftfm::DType::F32 : a.x_dtype;
  a.scale = static_cast<float>(scale);
  a.causal = causal;
  a.zero_empty = zero_empty;
  a.nq = nq;
  if (masked) {
    const Tensor& m = *mask;
    check_tensor(m, "mask", target);
    TORCH_CHECK(m.dim() == 4 && m.size(2) == nq && m.size(3) == C && m.size(0) * m.size(1) * nq == outer,
                "fasttfm: mask must be a [d0, d1, nq, nk] view with d0 * d1 * nq = rows, got shape ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == x.scalar_type(),
                "fasttfm: mask dtype must be bool or the input's (", x.scalar_type(), "), got ", m.scalar_type());
    a.mask.ptr = m.data_ptr();
    a.mask.is_bool = m.scalar_type() == at::kBool;
    a.mask.d1 = m.size(1);
    a.mask.s0 = stride_or_0(m, 0);
    a.mask.s1 = stride_or_0(m, 1);
    a.mask.sq = stride_or_0(m, 2);
    a.mask.sk = stride_or_0(m, 3);
  }
#ifdef FTFM_KERNELS
  if (target == Target::Gpu) {
    Tensor scratch;
    a.workspace = workspace(scratch, ftfm::softmax_workspace_floats(outer, C, inner, a.x_dtype, masked, false), x);
    ftfm::softmax_fwd(a, stream_of(x));
    return y;
  }
#endif
#ifndef FASTTFM_EMU
  ftfm::softmax_fwd_cpu(a);
#endif
  return y;
}

#ifdef FTFM_KERNELS

Tensor softmax_bwd(const Tensor& y, const Tensor& dy, int64_t nq, double scale, bool causal, at::ScalarType dx_type,
                   Target target) {
  check_softmax_3d(y, "output", target);
  check_softmax_3d(dy, "grad_output", target);
  check_same_shape_dtype(dy, "grad_output", y, "output");
  DeviceGuard guard(y, target);
  const int64_t outer = y.size(0), C = y.size(1), inner = y.size(2);
  TORCH_CHECK(dx_type == y.scalar_type() || y.scalar_type() == at::kFloat,
              "fasttfm: softmax grad dtype must be the output's or the output must be float32");
  TORCH_CHECK(inner == 1 || !causal, "fasttfm: causal needs the softmax axis to be the last");
  check_nq(outer, nq);
  Tensor dx = at::empty({outer, C, inner}, y.options().dtype(dx_type));
  if (dx.numel() == 0) return dx;
  ftfm::SoftmaxBwdArgs a;
  a.y = y.data_ptr();
  a.y_s0 = y.stride(0);
  a.y_s1 = y.stride(1);
  a.dy = dy.data_ptr();
  a.dy_s0 = dy.stride(0);
  a.dy_s1 = dy.stride(1);
  a.dx = dx.data_ptr();
  a.outer = outer;
  a.C = C;
  a.inner = inner;
  a.y_dtype = to_dtype(y, "output");
  a.dx_dtype = to_dtype(dx, "grad_input");
  a.scale = static_cast<float>(scale);
  a.causal = causal;
  a.nq = nq;
  Tensor scratch;
  a.workspace = workspace(scratch, ftfm::softmax_workspace_floats(outer, C, inner, a.y_dtype, false, true), y);
  ftfm::softmax_bwd(a, stream_of(y));
  return dx;
}

#endif  // FTFM_KERNELS

template <Target T>
Tensor softmax_fwd_on(const Tensor& x, int64_t nq, double scale, const OptTensor& mask, bool causal, bool zero_empty,
                      std::optional<at::ScalarType> dtype) {
  return softmax_fwd(x, nq, scale, mask, causal, zero_empty, dtype, T);
}
#ifdef FTFM_KERNELS
template <Target T>
Tensor softmax_bwd_on(const Tensor& y, const Tensor& dy, int64_t nq, double scale, bool causal, at::ScalarType dx_type) {
  return softmax_bwd(y, dy, nq, scale, causal, dx_type, T);
}
#endif  // FTFM_KERNELS

constexpr const char* kSoftmaxFwd = "(Tensor x, int nq, float scale, Tensor? mask, bool causal, bool zero_empty, "
                                    "ScalarType? dtype) -> Tensor";
constexpr const char* kSoftmaxBwd = "(Tensor y, Tensor dy, int nq, float scale, bool causal, ScalarType dx_dtype) -> Tensor";
// ==== end softmax =============================================================================
}  // namespace

TORCH_LIBRARY(FTFM_LIB, m) {
  auto def = [&m](const char* name, const char* schema, auto fn) { m.def((std::string(name) + schema).c_str(), fn); };
#ifdef FTFM_KERNELS
  // GPU kernels: CUDA tensors in fasttfm._C, CPU tensors through the emulator in fasttfm._C_emu.
  def("layer_norm_fwd", kLayerNormFwd, &layer_norm_fwd_on<Target::Gpu>);
  def("layer_norm_bwd", kLayerNormBwd, &layer_norm_bwd_on<Target::Gpu>);
  def("softmax_fwd", kSoftmaxFwd, &softmax_fwd_on<Target::Gpu>);  // softmax
  def("softmax_bwd", kSoftmaxBwd, &softmax_bwd_on<Target::Gpu>);  // softmax
#endif
#ifndef FASTTFM_EMU
  // CPU C++ kernels (csrc/cpu/), in every fasttfm._C.
  def("layer_norm_fwd_cpu", kLayerNormFwd, &layer_norm_fwd_on<Target::Cpu>);
  def("layer_norm_bwd_cpu", kLayerNormBwd, &layer_norm_bwd_on<Target::Cpu>);
  def("softmax_fwd_cpu", kSoftmaxFwd, &softmax_fwd_on<Target::Cpu>);  // softmax
#else
  m.def("set_order(int order, int seed) -> ()", &emu_set_order);
#endif
  // ---- cross-entropy section ----
#ifdef FTFM_KERNELS
  def("cross_entropy_fwd", kCeFwd, &cross_entropy_fwd_on<Target::Gpu>);
  def("cross_entropy_bwd", kCeBwd, &cross_entropy_bwd_on<Target::Gpu>);
  def("cross_entropy_bwd_inplace", kCeBwdInplace, &cross_entropy_bwd_inplace_on<Target::Gpu>);
#endif
#ifndef FASTTFM_EMU
  def("cross_entropy_fwd_cpu", kCeFwd, &cross_entropy_fwd_on<Target::Cpu>);
  def("cross_entropy_bwd_cpu", kCeBwd, &cross_entropy_bwd_on<Target::Cpu>);
  def("cross_entropy_bwd_inplace_cpu", kCeBwdInplace, &cross_entropy_bwd_inplace_on<Target::Cpu>);
#endif
  // ---- end of the cross-entropy section ----
  m.def("has_kernels() -> bool", []() -> bool {
#ifdef FTFM_KERNELS
    return true;
#else
    return false;
#endif
  });
}

// A Python module init so `import fasttfm._C` / `fasttfm._C_emu` loads the library (the ops are
// reached through torch.ops.<library>, not through module attributes).
#define FTFM_STR2(x) #x
#define FTFM_STR(x) FTFM_STR2(x)
#ifdef FASTTFM_EMU
#define FTFM_PYINIT PyInit__C_emu
#define FTFM_MODNAME "_C_emu"
#else
#define FTFM_PYINIT PyInit__C
#define FTFM_MODNAME "_C"
#endif
extern "C" PyMODINIT_FUNC FTFM_PYINIT(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, FTFM_MODNAME, "fasttfm kernels (" FTFM_STR(FTFM_LIB) ")",
                                   -1, nullptr};
  return PyModule_Create(&def);
}

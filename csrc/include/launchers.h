// Host-side launcher declarations shared by csrc/*.cu and csrc/bindings.cpp.
// Plain C++: no CUDA and no torch headers, so bindings.cpp can include it whatever it is built with.
// Pointers are device pointers on CUDA and host pointers under the emulator.
#pragma once
#include <cstdint>

namespace ftfm {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// ---- layer_norm.cu -------------------------------------------------------------------------
// x, y: [rows, cols], row r starts at x + r * x_row_stride (elements), columns contiguous.
// weight/bias: [cols] or nullptr (no affine / no bias); dtype w_dtype (== x dtype or F32).
// mean/rstd: [rows] fp32 outputs (mean unused and may be nullptr when rms).
// rms=true: RMSNorm (y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps)), else LayerNorm.
void layer_norm_fwd(const void* x, int64_t x_row_stride, const void* weight, const void* bias, void* y,
                    float* mean, float* rstd, int64_t rows, int64_t cols, float eps, bool rms, DType x_dtype,
                    DType w_dtype, void* stream);

// Number of row groups the backward splits rows into; the caller allocates
// dw_partial/db_partial as fp32 [layer_norm_bwd_parts(rows, cols), cols].
int64_t layer_norm_bwd_parts(int64_t rows, int64_t cols);

// dy, x: [rows, cols] with row strides; dx: [rows, cols] contiguous (a new buffer, never dy).
// dweight/dbias: [cols] in w_dtype or nullptr when not needed; partial buffers as above
// (nullptr when both dweight and dbias are nullptr). Reduction over rows is deterministic.
void layer_norm_bwd(const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                    const void* weight, const float* mean, const float* rstd, void* dx, float* dw_partial,
                    float* db_partial, void* dweight, void* dbias, int64_t rows, int64_t cols, bool rms,
                    DType x_dtype, DType w_dtype, void* stream);

// ---- csrc/cpu/norm_cpu.cpp: the same contract for CPU tensors (no stream; OpenMP inside) ---------
// dweight/dbias nullable; the parameter-gradient reduction is deterministic for any thread count.
void layer_norm_fwd_cpu(const void* x, int64_t x_row_stride, const void* weight, const void* bias, void* y,
                        float* mean, float* rstd, int64_t rows, int64_t cols, float eps, bool rms, DType x_dtype,
                        DType w_dtype);
void layer_norm_bwd_cpu(const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                        const void* weight, const float* mean, const float* rstd, void* dx, void* dweight,
                        void* dbias, int64_t rows, int64_t cols, bool rms, DType x_dtype, DType w_dtype);

// ---- cross_entropy.cu (cross-entropy section) -------------------------------------------------------
// logits: [rows, cols] with row stride (elements), classes contiguous, dtype `dtype`; target: [rows]
// int64; weight: [cols] fp32 class weights or nullptr, weight_sum: device/host pointer to their fp32
// sum (required with weight). Per-row loss
//   L = a * w_y * (lse - x_y) + b * (W * lse - sum_c w_c x_c) + z * lse^2   (w = 1 and W = cols unweighted)
// (torch smoothing eps: a = 1 - eps, b = eps / cols; fairseq: a = 1 - eps - eps/(cols-1), b = eps/(cols-1)).
// softcap > 0 (0 = off): the loss sees cap * tanh(x / cap) for every logit x (Gemma 2's final logit
// softcapping); the gradient includes the factor 1 - tanh^2.
// Rows with target == ignore_index: loss 0, lse 0, zero gradient. Any other target outside [0, cols):
// the CUDA kernels write NaN loss/lse/gradient for that row (no device assert, no host sync); the CPU
// kernels do the same and return the first such row (else -1) so the caller can raise.
// loss, lse: [rows] fp32 outputs. Requires rows >= 0 and 1 <= cols < 2^31; throws std::invalid_argument.
void cross_entropy_fwd(const void* logits, int64_t row_stride, const int64_t* target, const float* weight,
                       const float* weight_sum, float* loss, float* lse, int64_t rows, int64_t cols,
                       int64_t ignore_index, float a, float b, float z, float softcap, DType dtype, void* stream);
// dloss: per-row fp32 gradient of the row losses with a stride (0: one scalar for every row);
// dlogits: [rows, cols] output with its own row stride, may be exactly `logits` (in place).
void cross_entropy_bwd(const float* dloss, int64_t dloss_stride, const void* logits, int64_t row_stride,
                       const int64_t* target, const float* weight, const float* weight_sum, const float* lse,
                       void* dlogits, int64_t dlogits_stride, int64_t rows, int64_t cols, int64_t ignore_index,
                       float a, float b, float z, float softcap, DType dtype, void* stream);
// csrc/cpu/cross_entropy_cpu.cpp: the same contract for CPU tensors (OpenMP over rows).
int64_t cross_entropy_fwd_cpu(const void* logits, int64_t row_stride, const int64_t* target, const float* weight,
                              const float* weight_sum, float* loss, float* lse, int64_t rows, int64_t cols,
                              int64_t ignore_index, float a, float b, float z, float softcap, DType dtype);
int64_t cross_entropy_bwd_cpu(const float* dloss, int64_t dloss_stride, const void* logits, int64_t row_stride,
                              const int64_t* target, const float* weight, const float* weight_sum, const float* lse,
                              void* dlogits, int64_t dlogits_stride, int64_t rows, int64_t cols,
                              int64_t ignore_index, float a, float b, float z, float softcap, DType dtype);
// ---- end of the cross-entropy section ---------------------------------------------------------------

// ---- softmax.cu (softmax section) --------------------------------------------------------------
// Softmax over axis C of a tensor viewed as [outer, C, inner]: x element (o, c, i) at
// x + o * x_s0 + c * x_s1 + i (unit inner stride); y, dx are new contiguous [outer, C, inner] buffers.
// inner == 1 is the row case (rows = outer, cols = C, unit column stride required when C > 1); it
// alone supports scale/mask/causal. All math in fp32; y = exp(z - max z) / sum exp(z - max z) with
//   z[c] = x[c] * scale (+ additive mask), or -inf where a bool mask is false or c is causally hidden.
// Causal (bottom-right aligned): rows are [..., nq] blocks of query rows over C = nk keys; query q
// sees keys c <= q + nk - nq. zero_empty: rows whose max z is -inf (no visible key) give y = 0
// instead of torch's NaN.
struct SoftmaxMask {
  const void* ptr = nullptr;  // nullptr: no mask. Mask element (i0, i1, q, c) at ptr + i0*s0 + i1*s1 + q*sq + c*sk
  bool is_bool = false;       // bool (1 byte, nonzero = keep) or additive in the x dtype
  int64_t d1 = 1;             // rows = d0 * d1 * nq, row = (i0 * d1 + i1) * nq + q
  int64_t s0 = 0, s1 = 0, sq = 0, sk = 0;  // element strides; 0 broadcasts
};
struct SoftmaxFwdArgs {
  const void* x = nullptr;
  int64_t x_s0 = 0, x_s1 = 0;
  void* y = nullptr;
  int64_t outer = 0, C = 0, inner = 1;
  DType x_dtype = DType::F32, y_dtype = DType::F32;  // y: x's dtype or F32 (fused upcast)
  float scale = 1.f;
  bool causal = false, zero_empty = false;
  int64_t nq = 1;
  SoftmaxMask mask;
  float* workspace = nullptr;  // softmax_workspace_floats(...) floats (nullptr when that is 0)
};
// dx = scale * y * (dy - sum_c(y * dy)); y/dy element (o, c, i) at base + o*s0 + c*s1 + i.
// causal/nq as in the forward: hidden columns (y == 0 there) are not read and get dx = 0.
struct SoftmaxBwdArgs {
  const void* y = nullptr;
  int64_t y_s0 = 0, y_s1 = 0;
  const void* dy = nullptr;
  int64_t dy_s0 = 0, dy_s1 = 0;
  void* dx = nullptr;
  int64_t outer = 0, C = 0, inner = 1;
  DType y_dtype = DType::F32, dx_dtype = DType::F32;  // y/dy: dx's dtype or F32
  float scale = 1.f;
  bool causal = false;
  int64_t nq = 1;
  float* workspace = nullptr;
};
// fp32 workspace a launch needs on the current device (0 for most shapes: only rows too long for
// one block's registers or shared memory are split over several blocks and need it).
int64_t softmax_workspace_floats(int64_t outer, int64_t C, int64_t inner, DType dtype, bool masked, bool backward);
void softmax_fwd(const SoftmaxFwdArgs& args, void* stream);
void softmax_bwd(const SoftmaxBwdArgs& args, void* stream);
// csrc/cpu/softmax_cpu.cpp: the forward for CPU tensors, row case only (inner == 1; OpenMP inside;
// workspace unused). The backward on the CPU is aten's _softmax_backward_data.
void softmax_fwd_cpu(const SoftmaxFwdArgs& args);

// ---- emulator controls (fasttfm._C_emu only) -------------------------------------------------
// Run order of a block's threads: 0 forward, 1 reverse, 2 random (seeded, reshuffled each round).
void emu_set_order(int order, uint64_t seed);

}  // namespace ftfm

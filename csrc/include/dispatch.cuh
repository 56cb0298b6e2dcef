// From the runtime dtype tag (ftfm::DType, see launchers.h) to the C++ element type, for host launchers.
//
//   dispatch_float(x_dtype, "layer_norm_fwd", [&](auto tag) {
//     using T = typename decltype(tag)::type;            // float, __half or __nv_bfloat16
//     dispatch_weight<T>(w_dtype, "layer_norm_fwd", [&](auto wtag) {
//       using W = typename decltype(wtag)::type;         // T, or float (fp32 params with fp16/bf16 data)
//       launch<T, W>(...);
//     });
//   });
//
// Unknown dtypes throw std::invalid_argument naming the op. Each lambda body is instantiated once per
// type it can receive, so put only the launch (not the kernels' logic) inside.
#pragma once
#include "ftfm_cuda.h"
#include "launchers.h"

#include <stdexcept>
#include <string>

namespace ftfm {

template <typename T>
struct TypeTag {
  using type = T;
};

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "unknown dtype";
}

template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::F32; }
template <>
constexpr DType dtype_of<__half>() { return DType::F16; }
template <>
constexpr DType dtype_of<__nv_bfloat16>() { return DType::BF16; }

// f(TypeTag<T>{}) with T the element type of `d`.
template <typename F>
void dispatch_float(DType d, const char* op, F&& f) {
  switch (d) {
    case DType::F32: f(TypeTag<float>{}); return;
    case DType::F16: f(TypeTag<__half>{}); return;
    case DType::BF16: f(TypeTag<__nv_bfloat16>{}); return;
  }
  throw std::invalid_argument(std::string("fasttfm: ") + op + ": unsupported dtype code " +
                              std::to_string(static_cast<int>(d)));
}

// Parameter (weight/bias) dtype for data of type T: T itself or fp32 ("mixed": fp16/bf16 activations
// with fp32 parameters). f(TypeTag<W>{}). Anything else throws.
template <typename T, typename F>
void dispatch_weight(DType w, const char* op, F&& f) {
  if (w == dtype_of<T>()) {
    f(TypeTag<T>{});
  } else if (w == DType::F32) {
    f(TypeTag<float>{});
  } else {
    throw std::invalid_argument(std::string("fasttfm: ") + op + ": parameter dtype " + dtype_name(w) +
                                " must equal the input dtype " + dtype_name(dtype_of<T>()) + " or be float32");
  }
}

}  // namespace ftfm

// The one header every csrc/*.cu file includes instead of <cuda_runtime.h>.
//
// It lets the same kernel source build two ways:
//   * with nvcc into fasttfm._C (the real CUDA kernels), and
//   * with g++ and -DFASTTFM_EMU against the SIMT emulator (csrc/emu/simt.h) into
//     fasttfm._C_emu, where each CUDA thread is a fiber on the CPU.
//
// Contract for kernel files:
//   * no torch headers; kernels and launchers take raw pointers and sizes;
//   * launch only through FTFM_LAUNCH (g++ cannot parse <<<>>>):
//       auto k = my_kernel<float, 4>;                       // no commas inside the macro
//       FTFM_LAUNCH(k, grid, block, smem_bytes, stream, arg0, arg1, ...);
//     It throws std::runtime_error naming the kernel if the launch fails;
//   * dynamic shared memory only through FTFM_DYNAMIC_SMEM(T, name) inside the kernel body;
//   * static shared memory with plain `__shared__` at function scope;
//   * `stream` is a `void*` (a cudaStream_t on CUDA, ignored by the emulator).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef FASTTFM_EMU
#include "../emu/simt.h"
#define FTFM_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::ftfm_emu::launch(#kernel, kernel, dim3(grid), dim3(block), (size_t)(smem), __VA_ARGS__)
#define FTFM_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::ftfm_emu::dynamic_smem())
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
namespace ftfm {
inline void check_launch(const char* kernel, const char* file, int line) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fasttfm: launch of ") + kernel + " failed at " + file + ":" +
                             std::to_string(line) + ": " + cudaGetErrorString(err));
  }
}
}  // namespace ftfm
#define FTFM_LAUNCH(kernel, grid, block, smem, stream, ...)                                    \
  do {                                                                                         \
    kernel<<<dim3(grid), dim3(block), (size_t)(smem), (cudaStream_t)(stream)>>>(__VA_ARGS__); \
    ::ftfm::check_launch(#kernel, __FILE__, __LINE__);                                        \
  } while (0)
#define FTFM_DYNAMIC_SMEM(T, name)                                   \
  extern __shared__ __align__(16) unsigned char ftfm_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(ftfm_dyn_smem_)
#endif

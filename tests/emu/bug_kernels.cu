// Kernels with planted bugs: the emulator must report each one (tests/test_emu.py).
// Valid CUDA apart from the bugs themselves (the throwing kernel traps under nvcc).
#include "ftfm_cuda.h"
#include "emu_cases.h"

#include <stdexcept>

namespace emu_tests {

// (a) y[i] = x[i + 1] (last element: x[i]) staged through shared memory. Without the barrier a thread
// reads its neighbour's slot before the neighbour wrote it when lower threads run first.
__global__ void missing_sync_kernel(const float* x, float* y, int n, int fixed) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  s[t] = x[(size_t)blockIdx.x * n + t];
  if (fixed) __syncthreads();
  y[(size_t)blockIdx.x * n + t] = s[t + 1 < n ? t + 1 : t];
}

void missing_sync(const float* x, float* y, int rows, int n, bool fixed) {
  auto k = missing_sync_kernel;
  FTFM_LAUNCH(k, rows, n, 0, nullptr, x, y, n, (int)fixed);
}

// (b) __syncthreads in both branches: two different barriers.
__global__ void divergent_sync_kernel(float* y) {
  float v = threadIdx.x;
  if (threadIdx.x % 2) {
    v += 1.0f;
    __syncthreads();
  } else {
    v += 2.0f;
    __syncthreads();
  }
  y[threadIdx.x] = v;
}
void divergent_sync(float* y) {
  auto k = divergent_sync_kernel;
  FTFM_LAUNCH(k, 1, 64, 0, nullptr, y);
}

// (b') threads return early, the rest wait at a barrier that can never complete.
__global__ void exit_before_sync_kernel(float* y) {
  if (threadIdx.x >= 16) return;
  __syncthreads();
  y[threadIdx.x] = 1.0f;
}
void exit_before_sync(float* y) {
  auto k = exit_before_sync_kernel;
  FTFM_LAUNCH(k, 1, 32, 0, nullptr, y);
}

// (c) lane 31 calls a shuffle whose mask leaves it out.
__global__ void mask_excludes_lane_kernel(float* y) {
  float v = threadIdx.x;
  v += __shfl_xor_sync(0x7fffffffu, v, 1);
  y[threadIdx.x] = v;
}
void mask_excludes_lane(float* y) {
  auto k = mask_excludes_lane_kernel;
  FTFM_LAUNCH(k, 1, 32, 0, nullptr, y);
}

// (c') full-mask reduction after half the warp returned.
__global__ void mask_includes_exited_kernel(float* y) {
  if (threadIdx.x >= 16) return;
  float v = threadIdx.x;
  for (int o = 8; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  y[threadIdx.x] = v;
}
void mask_includes_exited(float* y) {
  auto k = mask_includes_exited_kernel;
  FTFM_LAUNCH(k, 1, 32, 0, nullptr, y);
}

// (c'') lanes disagree on the mask.
__global__ void mask_mismatch_kernel(float* y) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
  y[threadIdx.x] = __shfl_sync(mask, (float)threadIdx.x, 0);
}
void mask_mismatch(float* y) {
  auto k = mask_mismatch_kernel;
  FTFM_LAUNCH(k, 1, 32, 0, nullptr, y);
}

__global__ void bad_width_kernel(float* y) { y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1, 3); }
void bad_width(float* y) {
  auto k = bad_width_kernel;
  FTFM_LAUNCH(k, 1, 32, 0, nullptr, y);
}

// (d) lanes 0-15 wait at __syncwarp for lanes 16-31, which wait at __syncthreads for lanes 0-15.
__global__ void warp_deadlock_kernel(float* y) {
  if (threadIdx.x < 16)
    __syncwarp();
  else
    __syncthreads();
  y[threadIdx.x] = 1.0f;
}
void warp_deadlock(float* y) {
  auto k = warp_deadlock_kernel;
  FTFM_LAUNCH(k, 1, 32, 0, nullptr, y);
}

// (e) an error inside device code of one thread of one block.
__device__ float checked_value(int b, int t) {
  if (b == 2 && t == 5) {
#ifdef FASTTFM_EMU
    throw std::runtime_error("boom from device code");
#else
    __trap();
#endif
  }
  return (float)(b * 100 + t);
}
__global__ void throwing_kernel_impl(float* y) {
  y[blockIdx.x * blockDim.x + threadIdx.x] = checked_value(blockIdx.x, threadIdx.x);
  __syncthreads();
}
void throwing_kernel(float* y, int blocks) {
  auto throwing_kernel = throwing_kernel_impl;
  FTFM_LAUNCH(throwing_kernel, blocks, 32, 0, nullptr, y);
}

__global__ void trap_kernel_impl(float* y) {
  if (threadIdx.x == 3) __trap();
  y[threadIdx.x] = 1.0f;
}
void trap_kernel(float* y) {
  auto trap_kernel = trap_kernel_impl;
  FTFM_LAUNCH(trap_kernel, 1, 32, 0, nullptr, y);
}

// (f) dynamic shared memory read before anything was written to it.
__global__ void poison_read_kernel(unsigned* y) {
  FTFM_DYNAMIC_SMEM(unsigned, s);
  y[threadIdx.x] = s[threadIdx.x];
}
void poison_read(unsigned* y, int n) {
  auto k = poison_read_kernel;
  FTFM_LAUNCH(k, 1, n, n * sizeof(unsigned), nullptr, y);
}

// Off-by-one past the end of the dynamic shared memory: a write, and a read (for the ASan build).
__global__ void smem_overflow_kernel(unsigned* y) {
  FTFM_DYNAMIC_SMEM(unsigned, s);
  s[threadIdx.x + 1] = threadIdx.x;  // thread n-1 writes s[n]
  __syncthreads();
  y[threadIdx.x] = s[threadIdx.x];
}
void smem_overflow(unsigned* y, int n) {
  auto k = smem_overflow_kernel;
  FTFM_LAUNCH(k, 1, n, n * sizeof(unsigned), nullptr, y);
}
__global__ void smem_overread_kernel(unsigned* y) {
  FTFM_DYNAMIC_SMEM(unsigned, s);
  s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  y[threadIdx.x] = s[threadIdx.x + 1];  // SMEM_OVERREAD_LINE: thread n-1 reads s[n]
}
void smem_overread(unsigned* y, int n) {
  auto k = smem_overread_kernel;
  FTFM_LAUNCH(k, 1, n, n * sizeof(unsigned), nullptr, y);
}

// Launch configurations CUDA rejects.
__global__ void noop_kernel(int* p) {
  if (p) p[0] = 0;
}
void launch_config(int case_id) {
  auto k = noop_kernel;
  int* p = nullptr;
  switch (case_id) {
    case 0: FTFM_LAUNCH(k, 1, 1025, 0, nullptr, p); break;
    case 1: FTFM_LAUNCH(k, 1, 0, 0, nullptr, p); break;
    case 2: FTFM_LAUNCH(k, 1, dim3(32, 32, 2), 0, nullptr, p); break;
    case 3: FTFM_LAUNCH(k, 0, 32, 0, nullptr, p); break;
    default: FTFM_LAUNCH(k, 1, 1024, 0, nullptr, p); break;  // legal
  }
}

}  // namespace emu_tests

// Correct kernels for the emulator tests. Written to the csrc/include/ftfm_cuda.h contract, so they
// build with nvcc too (tests/test_emu.py compiles them for sm_90 when nvcc is there).
#include "ftfm_cuda.h"
#include "emu_cases.h"

#include <cmath>

namespace emu_tests {

// ------------------------------------------------------------------ row softmax (block reduction)
__device__ __forceinline__ float warp_reduce(float v, bool is_max) {
  for (int o = 16; o > 0; o >>= 1) {
    float t = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, t) : v + t;
  }
  return v;
}

// blockDim.x must be a multiple of 32; red holds 33 floats.
__device__ float block_reduce(float v, float* red, bool is_max) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_reduce(v, is_max);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nwarps ? red[lane] : (is_max ? -INFINITY : 0.0f);
    t = warp_reduce(t, is_max);
    if (lane == 0) red[32] = t;
  }
  __syncthreads();
  const float r = red[32];
  __syncthreads();  // red is reused by the next reduction
  return r;
}

__global__ void __launch_bounds__(1024) softmax_kernel(const float* __restrict__ x, float* __restrict__ y, int cols) {
  __shared__ float red[33];
  const float* xr = x + (size_t)blockIdx.x * cols;
  float* yr = y + (size_t)blockIdx.x * cols;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, __ldg(xr + i));
  m = block_reduce(m, red, true);
  float s = 0.0f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) s += __expf(xr[i] - m);
  const float inv = 1.0f / block_reduce(s, red, false);
  for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = __expf(xr[i] - m) * inv;
}

void softmax_rows(const float* x, float* y, int rows, int cols, int threads) {
  auto k = softmax_kernel;
  FTFM_LAUNCH(k, rows, threads, 0, nullptr, x, y, cols);
}

// ------------------------------------------------------------------ partial warps, exact masks
__global__ void partial_warp_kernel(int* out) {
  __shared__ int warp_sums[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int active = min(32, (int)blockDim.x - warp * 32);  // lanes present in this warp
  const unsigned mask = active == 32 ? 0xffffffffu : (1u << active) - 1u;
  int v = tid + 1;
  for (int o = 16; o > 0; o >>= 1) {
    int t = __shfl_down_sync(mask, v, o);
    if (lane + o < active) v += t;  // never use a value from a lane outside the mask
  }
  const unsigned big = __ballot_sync(mask, tid % 2 == 0);
  if (lane == 0) warp_sums[warp] = v;
  const int count = __syncthreads_count(tid % 3 == 0);
  __shared__ int ballot_total;
  if (tid == 0) ballot_total = 0;
  __syncthreads();
  if (lane == 0) atomicAdd(&ballot_total, __popc(big));
  __syncthreads();
  if (tid == 0) {
    int s = 0;
    for (int w = 0; w < (int)(blockDim.x + 31) / 32; ++w) s += warp_sums[w];
    out[3 * blockIdx.x] = s;
    out[3 * blockIdx.x + 1] = count;
    out[3 * blockIdx.x + 2] = ballot_total;
  }
}

void partial_warp_sum(int* out, int blocks, int threads) {
  auto k = partial_warp_kernel;
  FTFM_LAUNCH(k, blocks, threads, 0, nullptr, out);
}

// ------------------------------------------------------------------ atomics histogram
__global__ void histogram_kernel(const int* v, const float* w, int n, int bins, int* hist, float* whist,
                                 double* dsum, unsigned long long* total, int* vmax, int* vmin) {
  __shared__ int sh[64];
  __shared__ float shw[64];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) sh[b] = 0, shw[b] = 0.0f;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    atomicAdd(&sh[v[i]], 1);
    atomicAdd(&shw[v[i]], w[i]);
    atomicAdd(dsum, (double)w[i]);
    atomicAdd(total, 1ull);
    atomicMax(vmax, v[i]);
    atomicMin(vmin, v[i]);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) {
    atomicAdd(&hist[b], sh[b]);
    atomicAdd(&whist[b], shw[b]);
  }
}

void histogram(const int* v, const float* w, int n, int bins, int* hist, float* whist, double* dsum,
               unsigned long long* total, int* vmax, int* vmin) {
  auto k = histogram_kernel;
  FTFM_LAUNCH(k, 7, 96, 0, nullptr, v, w, n, bins, hist, whist, dsum, total, vmax, vmin);
}

// ------------------------------------------------------------------ dynamic shared memory
__global__ void reverse_dyn_kernel(const int* in, int* out, int* align) {
  FTFM_DYNAMIC_SMEM(int, s);
  const int n = blockDim.x, t = threadIdx.x;
  const int* src = in + (size_t)blockIdx.x * n;
  s[t] = src[t];
  __syncthreads();
  out[(size_t)blockIdx.x * n + t] = s[n - 1 - t];
  if (t == 0) align[blockIdx.x] = (int)((uintptr_t)s % 16);
}

void reverse_dyn(const int* in, int* out, int* align, int blocks, int threads) {
  auto k = reverse_dyn_kernel;
  FTFM_LAUNCH(k, blocks, threads, threads * sizeof(int), nullptr, in, out, align);
}

// ------------------------------------------------------------------ 3-D grid and block indices
__global__ void grid_index_kernel(int* out, int* dims) {
  const int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int nthr = blockDim.x * blockDim.y * blockDim.z;
  const int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  out[block * nthr + thread] = blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z + 1000 * threadIdx.x +
                               10000 * threadIdx.y + 100000 * threadIdx.z;
  if (thread == 0) {
    int* d = dims + block * 6;
    d[0] = gridDim.x, d[1] = gridDim.y, d[2] = gridDim.z, d[3] = blockDim.x, d[4] = blockDim.y, d[5] = blockDim.z;
  }
}

void grid_index(int* out, int* dims, int gx, int gy, int gz, int bx, int by, int bz) {
  auto k = grid_index_kernel;
  FTFM_LAUNCH(k, dim3(gx, gy, gz), dim3(bx, by, bz), 0, nullptr, out, dims);
}

// ------------------------------------------------------------------ shuffle semantics per type
template <class T>
__device__ double to_double(T v) { return (double)v; }
template <>
__device__ double to_double<__half>(__half v) { return (double)__half2float(v); }
template <>
__device__ double to_double<__nv_bfloat16>(__nv_bfloat16 v) { return (double)__bfloat162float(v); }
template <class T>
__device__ T from_int(int v) { return (T)v; }
template <>
__device__ __half from_int<__half>(int v) { return __float2half((float)v); }
template <>
__device__ __nv_bfloat16 from_int<__nv_bfloat16>(int v) { return __float2bfloat16((float)v); }

template <class T>
__global__ void shuffle_kernel(double* out) {
  const int tid = threadIdx.x, lane = tid & 31;
  const T v = from_int<T>(tid * 7 + 3);
  int wi = 0;
  for (int w = 32; w >= 1; w >>= 1, ++wi) {
    double* o = out + (size_t)wi * 4 * 64;
    o[0 * 64 + tid] = to_double(__shfl_sync(0xffffffffu, v, lane * 3 + 1, w));
    o[1 * 64 + tid] = to_double(__shfl_up_sync(0xffffffffu, v, 3, w));
    o[2 * 64 + tid] = to_double(__shfl_down_sync(0xffffffffu, v, 5, w));
    o[3 * 64 + tid] = to_double(__shfl_xor_sync(0xffffffffu, v, 6, w));
  }
}

void shuffles(double* out, int type) {
  switch (type) {
    case 0: { auto k = shuffle_kernel<int>; FTFM_LAUNCH(k, 1, 64, 0, nullptr, out); break; }
    case 1: { auto k = shuffle_kernel<float>; FTFM_LAUNCH(k, 1, 64, 0, nullptr, out); break; }
    case 2: { auto k = shuffle_kernel<double>; FTFM_LAUNCH(k, 1, 64, 0, nullptr, out); break; }
    case 3: { auto k = shuffle_kernel<long long>; FTFM_LAUNCH(k, 1, 64, 0, nullptr, out); break; }
    case 4: { auto k = shuffle_kernel<__half>; FTFM_LAUNCH(k, 1, 64, 0, nullptr, out); break; }
    default: { auto k = shuffle_kernel<__nv_bfloat16>; FTFM_LAUNCH(k, 1, 64, 0, nullptr, out); break; }
  }
}

// ------------------------------------------------------------------ votes and counting barriers
__global__ void votes_kernel(unsigned* votes, int* syncs) {
  const int tid = threadIdx.x, lane = tid & 31;
  votes[tid * 4 + 0] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  votes[tid * 4 + 1] = __any_sync(0xffffffffu, lane == 17);
  votes[tid * 4 + 2] = __all_sync(0xffffffffu, lane < 31);
  votes[tid * 4 + 3] = __all_sync(__activemask(), 1);
  __syncwarp();
  // two collectives with disjoint masks in one warp at once: each half votes on its own
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  votes[64 * 4 + tid] = __ballot_sync(half, lane & 1);
  const int c = __syncthreads_count(tid % 5 == 0);
  const int a = __syncthreads_and(tid < 64);
  const int o = __syncthreads_or(tid == 63);
  const int a2 = __syncthreads_and(tid != 7);
  if (tid == 0) syncs[0] = c, syncs[1] = a, syncs[2] = o, syncs[3] = a2;
}

void votes(unsigned* v, int* syncs) {
  auto k = votes_kernel;
  FTFM_LAUNCH(k, 1, 64, 0, nullptr, v, syncs);
}

// ------------------------------------------------------------------ fp16 / bf16 arithmetic
__global__ void half_kernel(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool in = i < n;
  const float xi = in ? x[i] : 0.0f;
  const __half h = __float2half(xi) * __float2half(2.0f) + __float2half(1.0f);
  const __nv_bfloat16 b = __float2bfloat16(xi) + __float2bfloat16(xi);
  const half2 h2 = __floats2half2_rn(xi, xi * 0.5f);
  const half2 from_next = __shfl_down_sync(0xffffffffu, h2, 1);  // lane 31 keeps its own
  // per block: y[3n + b] = (threads in range) * 1.5, through fp16 and bf16 shared-memory atomics
  __shared__ __half hcount;
  __shared__ __nv_bfloat16 bcount;
  if (threadIdx.x == 0) hcount = __float2half(0.0f), bcount = __float2bfloat16(0.0f);
  __syncthreads();
  if (in) atomicAdd(&hcount, __float2half(1.0f)), atomicAdd(&bcount, __float2bfloat16(0.5f));
  __syncthreads();
  if (threadIdx.x == 0) y[3 * n + blockIdx.x] = __half2float(hcount) + __bfloat162float(bcount);
  if (in) {
    y[i] = __half2float(h);
    y[n + i] = __bfloat162float(b);
    y[2 * n + i] = __high2float(from_next);
  }
}

void half_math(const float* x, float* y, int n) {
  auto k = half_kernel;
  FTFM_LAUNCH(k, (n + 63) / 64, 64, 0, nullptr, x, y, n);
}

}  // namespace emu_tests

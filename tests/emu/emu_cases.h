// Host launchers of the emulator test kernels (tests/emu/*.cu), called by tests/emu/driver.cpp.
// Plain C++ like csrc/include/launchers.h: raw host pointers, sizes; every launcher throws
// std::runtime_error when the launch (or, under the emulator, the kernel) fails.
#pragma once
#include <cstdint>

namespace emu_tests {

// ---- correct kernels (ok_kernels.cu) ----
// Row softmax, one block of `threads` (a multiple of 32) per row; warp shuffles + shared memory.
void softmax_rows(const float* x, float* y, int rows, int cols, int threads);
// Sum of 1..blockDim.x per block for any block size (partial last warp, exact shuffle masks);
// out[3 * b] = sum, out[3 * b + 1] = __syncthreads_count(tid % 3 == 0), out[3 * b + 2] = ballot popcount.
void partial_warp_sum(int* out, int blocks, int threads);
// Histogram of values in [0, bins) with shared-memory and global atomics:
// hist[b] = count (int), whist[b] = sum of weights (float), dsum = sum of weights (double),
// total = n (unsigned long long), vmax/vmin = max/min value.
void histogram(const int* v, const float* w, int n, int bins, int* hist, float* whist, double* dsum,
               unsigned long long* total, int* vmax, int* vmin);
// Each block reverses its blockDim.x-element slice of `in` through dynamic shared memory;
// align[b] = dynamic smem address % 16.
void reverse_dyn(const int* in, int* out, int* align, int blocks, int threads);
// 3-D grid and block: out[block * nthreads + thread] = bx + 10 by + 100 bz + 1000 tx + 10000 ty +
// 100000 tz; dims[block * 6 + i] = gridDim.xyz, blockDim.xyz.
void grid_index(int* out, int* dims, int gx, int gy, int gz, int bx, int by, int bz);
// 64 threads; for each width in {32, 16, 8, 4, 2, 1}: out[((w_i * 4 + op) * 64 + tid)] = shuffle of
// value tid * 7 + 3 (op 0 idx src (lane*3+1), 1 up 3, 2 down 5, 3 xor 6); type: 0 int, 1 float,
// 2 double, 3 long long, 4 half, 5 bf16 (results converted to double).
void shuffles(double* out, int type);
// 64 threads: votes[tid * 4 + {0,1,2,3}] = ballot(lane % 3 == 0), any(lane == 17), all(lane < 31),
// all(true); votes[256 + tid] = ballot over the thread's half-warp (mask 0x0000ffff or 0xffff0000) of
// odd lanes; syncs[0..3] = __syncthreads_count(tid % 5 == 0), _and(tid < 64), _or(tid == 63), _and(tid != 7).
void votes(unsigned* votes, int* syncs);
// fp16/bf16 device arithmetic: y[i] = float(half(x[i]) * half(2) + half(1)),
// y[n + i] = float(bf16(x[i]) + bf16(x[i])), y[2n + i] = float(warp-shuffled half2 .y),
// y[3n + b] = 1.5 * (threads of block b below n), counted with fp16 and bf16 atomicAdd (64 threads/block).
void half_math(const float* x, float* y, int n);

// ---- planted bugs (bug_kernels.cu) ----
void missing_sync(const float* x, float* y, int rows, int n, bool fixed);  // y = x shifted left by one
void divergent_sync(float* y);           // __syncthreads in both branches of an if
void exit_before_sync(float* y);         // half the block returns before a __syncthreads
void mask_excludes_lane(float* y);       // a lane calls a shuffle whose mask leaves it out
void mask_includes_exited(float* y);     // full-mask shuffle after half the warp returned
void mask_mismatch(float* y);            // lanes disagree on the mask
void bad_width(float* y);                // shuffle width 3
void warp_deadlock(float* y);            // half the warp at __syncwarp, the other half at __syncthreads
void throwing_kernel(float* y, int blocks);  // block 2 thread 5 throws (emulator) / traps (GPU)
void trap_kernel(float* y);              // __trap()
void poison_read(unsigned* y, int n);    // reads dynamic smem before writing it
void smem_overflow(unsigned* y, int n);  // writes one element past the dynamic smem
void smem_overread(unsigned* y, int n);  // reads one element past the dynamic smem (ASan build)
void launch_config(int case_id);         // illegal block/grid sizes

}  // namespace emu_tests

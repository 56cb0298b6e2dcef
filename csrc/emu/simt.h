// csrc/emu/simt.h -- a small SIMT emulator: runs CUDA kernel source on the CPU.
//
// Included by csrc/include/ftfm_cuda.h when FASTTFM_EMU is defined; a .cu file is then
// compiled as C++ (g++ -x c++ -std=c++17 -DFASTTFM_EMU -I<cuda>/include ...). No cudart needed.
//
// Scheduling model
//   * ftfm_emu::launch() runs the blocks of the grid one after another on the calling OS thread
//     (x fastest, then y, then z). `__shared__` is `thread_local`, so each OS thread has one copy
//     of every static shared variable and a block sees it alone while it runs.
//   * Inside a block every CUDA thread is a fiber with its own stack (pooled per OS thread). The
//     scheduler makes rounds over the fibers in the run order (forward, reverse, or random
//     reshuffled every round, see set_order); each runnable fiber runs until it blocks in a
//     barrier or warp collective, or returns. Nothing preempts a fiber: a thread that spins on a
//     flag written by another thread (or block) never yields and hangs the emulator.
//   * __syncthreads is a real barrier over all threads of the block: it completes when the last
//     thread arrives. Threads waiting at different call sites (file:line), or a thread exiting while
//     others wait, is reported as a divergent barrier.
//   * Warp collectives (__shfl*_sync, __ballot_sync, __any/__all_sync, __syncwarp) meet in per-warp
//     slots: each calling lane must be in its own mask, every lane named in the mask must arrive at
//     the same call (same op and call site) with the same mask, and none of them may have exited
//     (stricter than sm_70+ hardware, which tolerates exited lanes but returns undefined values).
//     A shuffle reading a lane outside the mask returns all-ones bits (NaN / -1) as poison.
//   * A round in which no fiber can run is a deadlock. Every error aborts the block (its fibers are
//     dropped without unwinding; their stacks go back to the pool) and launch() throws
//     std::runtime_error naming the kernel, block, thread and problem. A C++ exception escaping a
//     kernel is caught at the bottom of its fiber and reported the same way; exceptions never
//     cross a stack switch.
//   * Dynamic shared memory (FTFM_DYNAMIC_SMEM) is 16-byte aligned, exactly dyn_smem bytes,
//     filled with 0xFF before each block; 64 canary bytes behind it are checked after each block
//     (and poisoned for ASan). Static __shared__ memory is NOT poisoned: it keeps whatever the
//     previous block on this OS thread left (zero before the first).
//   * Stack switching: hand-written x86-64 switch (callee-saved registers, MXCSR, x87 control
//     word); ucontext elsewhere. ASan builds tell the sanitizer about every switch.
// Environment: FTFM_EMU_STACK_KB (fiber stack, default 64, x4 under ASan),
//              FTFM_EMU_ORDER=forward|reverse|random[:seed] (initial run order).
//
// Use: write the .cu file to the ftfm_cuda.h contract (FTFM_LAUNCH, FTFM_DYNAMIC_SMEM, no torch) and
//   g++ -std=c++17 -O2 -g -DFASTTFM_EMU -Icsrc/include -I<cuda>/include -Wno-unknown-pragmas
//       -x c++ -c my_kernels.cu -o my_kernels.o          (one command; add -fPIC for a Python extension)
// (<cuda>/include: $CUDA_HOME/include, or TOP= from `nvcc --dryrun`; see tests/_cuda_home.py.)
// Link with -pthread; nothing from CUDA. ftfm_emu::set_order() picks the run order at run time.
//
// Limitations
//   * Blocks run one at a time, so races *between* blocks never show, and a block that waits for
//     another block (spin locks, flags in global memory) hangs. Within a block only the chosen order
//     exposes a race: run tests in several orders.
//   * Static __shared__ memory is not poisoned (see above); __CUDA_ARCH__ is undefined, so code
//     behind `#ifdef __CUDA_ARCH__` (inline PTX, cp.async, wgmma) is not exercised.
//   * Fast-math intrinsics (__expf, __fdividef, ...) are the accurate C functions; no FMA contraction
//     rules of nvcc: compare with tolerances, never bit for bit.
//   * __activemask() returns every lane of the warp that has not exited (hardware may return fewer).
//   * A fiber stack overflow (deep recursion, big local arrays) hits a guard page: SIGSEGV. Raise
//     FTFM_EMU_STACK_KB. Fibers of an aborted block are dropped without running destructors.
#pragma once
#define FTFM_EMU_SIMT_CORE 1
#ifndef FASTTFM_EMU
#error "csrc/emu/simt.h is the emulator side of ftfm_cuda.h: compile with -DFASTTFM_EMU"
#endif

#include <math.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>  // before `__noinline__` is redefined: libstdc++ spells __attribute__((__noinline__))
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cxxabi.h>
#include <dlfcn.h>
#include <unistd.h>

// The toolkit's host-side headers: dim3/uint3/float4, cudaStream_t, __half/__nv_bfloat16 with host
// arithmetic and conversions. Their device-only parts stay hidden because __CUDACC__ is unset.
#include <vector_types.h>
#include <vector_functions.h>
#include <driver_types.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "simt_fiber.h"  // stacks and context switches (FTFM_EMU_UCONTEXT forces the portable one)

// ---- CUDA keywords (host_defines.h already maps __global__/__device__/__host__ to nothing) ----
#undef __shared__
#define __shared__ thread_local
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __noinline__
#define __noinline__ __attribute__((noinline))
// `#pragma unroll` is CUDA's; silences the warning on GCC >= 13 and clang (GCC 12 needs -Wno-unknown-pragmas).
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

namespace ftfm_emu {

enum Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Stats {  // per OS thread
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0;
};

namespace detail {

// ------------------------------------------------------------------------------ configuration
inline int env_order(uint64_t* seed) {
  const char* s = std::getenv("FTFM_EMU_ORDER");
  if (!s || !*s) return kForward;
  const char* colon = std::strchr(s, ':');
  if (colon) *seed = std::strtoull(colon + 1, nullptr, 0);
  std::string w(s, colon ? size_t(colon - s) : std::strlen(s));
  if (w == "reverse" || w == "1") return kReverse;
  if (w == "random" || w == "2") return kRandom;
  return kForward;
}
struct Config {
  std::atomic<int> order{kForward};
  std::atomic<uint64_t> seed{0};
  size_t stack_bytes = 64 << 10;
  Config() {
    uint64_t sd = 0;
    order = env_order(&sd);
    seed = sd;
#ifdef FTFM_EMU_ASAN
    stack_bytes *= 4;  // ASan frames carry redzones
#endif
    if (const char* kb = std::getenv("FTFM_EMU_STACK_KB")) stack_bytes = size_t(std::max(16L, std::atol(kb))) << 10;
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    stack_bytes = (stack_bytes + page - 1) / page * page;
  }
};
inline Config& config() {
  static Config c;  // thread-safe initialisation
  return c;
}

// ------------------------------------------------------------------------------ fibers & blocks
enum class St : uint8_t { Runnable, AtBarrier, AtWarp, Done };
enum Op : uint8_t { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp };
inline const char* op_name(int op) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp"};
  return names[op];
}

struct Fiber {  // one CUDA thread
  FiberCtx ctx;
  uint3 tid;
  unsigned id = 0, warp = 0, lane = 0;
  St state = St::Done;
  const char* file = "";  // call site of the barrier / collective it waits at
  int line = 0;
  uint64_t cval = 0, cres = 0;  // this lane's value in, result out, of a warp collective
  int carg = 0, cwidth = 32;
  int bar_result = 0;
};

struct Coll {  // one warp collective in flight: lanes in `mask` meet here
  uint8_t op = 0;
  unsigned mask = 0, arrived = 0;
  const char* file = "";
  int line = 0;
};
struct Warp {
  unsigned alive = 0;  // lanes that exist in the block and have not exited
  unsigned open = 0;   // bit i: slots[i] is in flight
  Coll slots[32];      // disjoint masks, so at most 32 at once
};

struct Block {
  const char* name = "";
  const void* kfn = nullptr;
  dim3 grid, bdim;
  uint3 bid;
  unsigned n = 0;  // threads per block
  Fiber* fibers = nullptr;
  Warp* warps = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  unsigned char* dyn = nullptr;
  size_t dyn_size = 0;
  // __syncthreads state: the barrier instance now filling up
  unsigned bar_arrived = 0, bar_first = 0, exited = 0, first_exited = 0;
  int bar_kind = 0, bar_sum = 0;
  const char* bar_file = "";
  int bar_line = 0;
  std::string error;  // first error; non-empty aborts the block
  SchedCtx sched;
};

inline thread_local Fiber* t_cur = nullptr;  // the fiber running now (nullptr in the scheduler)
inline thread_local Block* t_blk = nullptr;  // the block running now

constexpr size_t kCanary = 64;  // bytes checked behind the dynamic shared memory
struct ThreadRes {              // per-OS-thread pools, reused by every launch on this thread
  StackPool stacks;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned> order;
  unsigned char* dyn = nullptr;
  size_t dyn_cap = 0;
  uint64_t rng = 0;
  Stats stats;
  ~ThreadRes() { std::free(dyn); }
};
inline ThreadRes& res() {
  static thread_local ThreadRes r;
  return r;
}

inline void switch_out(Fiber* f, bool exiting) { fiber_yield(&f->ctx, &t_blk->sched, exiting); }

// ------------------------------------------------------------------------------ errors
inline std::string xyz(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
inline std::string hex(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}
inline std::string site(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }
inline bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || std::strcmp(f1, f2) == 0);
}
// "ftfm_emu: kernel 'name'", plus the demangled symbol when the dynamic symbol table has it (shared
// libraries; executables linked with -rdynamic) and it says more than the FTFM_LAUNCH argument.
inline std::string kernel_label(const char* name, const void* kfn) {
  std::string s = std::string("ftfm_emu: kernel '") + name + "'";
  Dl_info info;
  if (kfn && dladdr(kfn, &info) && info.dli_sname && info.dli_saddr == kfn) {
    int st = 0;
    char* dm = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
    std::string sym = (st == 0 && dm) ? dm : info.dli_sname;
    std::free(dm);
    if (sym != name) s += " [" + sym + "]";
  }
  return s;
}
inline uint3 tid_of(const Block* b, unsigned id) {
  return make_uint3(id % b->bdim.x, (id / b->bdim.x) % b->bdim.y, id / (b->bdim.x * b->bdim.y));
}
// Records the block's first error. Returns normally (temporaries die at the caller's `;`), so a
// fiber calls abort_fiber() right after it.
inline void set_error(const std::string& what, const Fiber* f = t_cur) {
  Block* b = t_blk;
  if (!b) throw std::logic_error("ftfm_emu: " + what + " outside a kernel");
  if (!b->error.empty()) return;
  b->error = kernel_label(b->name, b->kfn) + " block " + xyz(b->bid);
  if (f) b->error += " thread " + xyz(f->tid) + " (warp " + std::to_string(f->warp) + " lane " + std::to_string(f->lane) + ")";
  b->error += ": " + what;
}
[[noreturn]] inline void abort_fiber() {  // leave for good: the scheduler sees the error, drops the block
  switch_out(t_cur, false);
  __builtin_trap();
}

// ------------------------------------------------------------------------------ thread exit
inline void thread_exited(Fiber* f) {
  Block* b = t_blk;
  f->state = St::Done;
  if (b->exited++ == 0) b->first_exited = f->id;
  Warp& w = b->warps[f->warp];
  w.alive &= ~(1u << f->lane);
  if (b->bar_arrived)
    set_error("divergent __syncthreads: thread exited while " + std::to_string(b->bar_arrived) +
              " thread(s) of the block wait at __syncthreads (" + site(b->bar_file, b->bar_line) +
              "); every thread must reach every barrier");
  for (unsigned m = w.open; m; m &= m - 1)
    if (const Coll& c = w.slots[__builtin_ctz(m)]; c.mask & (1u << f->lane))
      set_error("bad shuffle mask " + hex(c.mask) + ": lane " + std::to_string(f->lane) + " exited while lanes " +
                hex(c.arrived) + " wait for it at " + op_name(c.op) + " (" + site(c.file, c.line) + ")");
}

// Bottom of every fiber: runs the kernel for one CUDA thread. Exceptions stop here, on the fiber's
// own stack; they never unwind across a stack switch.
[[noreturn]] inline void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Block* b = t_blk;
  fiber_started(&b->sched);
  try {
    b->body(b->ctx);
  } catch (const std::exception& e) {
    set_error(std::string("C++ exception escaped the kernel: ") + e.what());
  } catch (...) {
    set_error("C++ exception of unknown type escaped the kernel");
  }
  thread_exited(f);
  switch_out(f, true);
  __builtin_trap();  // an exited fiber is never resumed
}

// ------------------------------------------------------------------------------ __syncthreads
inline const char* bar_name(int kind) {
  static const char* names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and", "__syncthreads_or"};
  return names[kind];
}
// Error paths live in cold out-of-line functions: the hot functions keep small stack frames, which
// matters with hundreds of fiber stacks competing for the cache. The message is built by a function
// that returns first, so no std::string is left alive on the stack of the fiber that is dropped.
[[gnu::cold, gnu::noinline]] inline std::string barrier_message(int kind, const char* file, int line) {
  Block* b = t_blk;
  const std::string here = std::string("divergent __syncthreads: reached ") + bar_name(kind) + " at " + site(file, line);
  if (b->exited)
    return here + " after thread " + xyz(tid_of(b, b->first_exited)) + " exited; every thread must reach every barrier";
  return here + " while " + std::to_string(b->bar_arrived) + " thread(s), first " + xyz(tid_of(b, b->bar_first)) +
         ", wait at " + bar_name(b->bar_kind) + " at " + site(b->bar_file, b->bar_line);
}
[[noreturn, gnu::cold, gnu::noinline]] inline void barrier_error(int kind, const char* file, int line) {
  set_error(barrier_message(kind, file, line));
  abort_fiber();
}

// kind: 0 __syncthreads, 1 _count, 2 _and, 3 _or. Returns the number of threads with pred != 0.
inline int sync_block(int kind, int pred, const char* file, int line) {
  Block* b = t_blk;
  Fiber* f = t_cur;
  if (!f) throw std::logic_error("ftfm_emu: __syncthreads called outside a kernel");
  if (b->exited || (b->bar_arrived && (b->bar_kind != kind || !same_site(b->bar_file, b->bar_line, file, line))))
    barrier_error(kind, file, line);
  if (b->bar_arrived == 0) {
    b->bar_kind = kind, b->bar_file = file, b->bar_line = line, b->bar_first = f->id, b->bar_sum = 0;
  }
  b->bar_sum += pred != 0;
  if (++b->bar_arrived < b->n) {  // wait for the rest
    f->state = St::AtBarrier, f->file = file, f->line = line;
    switch_out(f, false);
    return f->bar_result;
  }
  const int sum = b->bar_sum;  // last to arrive: release everyone, carry on without yielding
  for (unsigned i = 0; i < b->n; ++i)
    if (b->fibers[i].state == St::AtBarrier) b->fibers[i].state = St::Runnable, b->fibers[i].bar_result = sum;
  b->bar_arrived = 0;
  return sum;
}

}  // namespace detail
}  // namespace ftfm_emu

#include "simt_warp.h"  // warp collectives (shuffles, votes, __syncwarp)

namespace ftfm_emu {
namespace detail {

// ------------------------------------------------------------------------------ the scheduler
inline uint64_t next_rand(uint64_t& s) {  // splitmix64
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline std::string deadlock_message(Block* b) {
  std::string m = "deadlock: no thread can make progress;";
  if (b->bar_arrived)
    m += " " + std::to_string(b->bar_arrived) + " of " + std::to_string(b->n) + " threads wait at __syncthreads (" +
         site(b->bar_file, b->bar_line) + ");";
  for (unsigned wi = 0; wi < (b->n + 31) / 32; ++wi)
    for (unsigned o = b->warps[wi].open; o; o &= o - 1) {
      const Coll& c = b->warps[wi].slots[__builtin_ctz(o)];
      m += " warp " + std::to_string(wi) + " lanes " + hex(c.arrived) + " wait at " + op_name(c.op) + " (" +
           site(c.file, c.line) + ") with mask " + hex(c.mask) + " for lanes " + hex(c.mask & ~c.arrived) + ";";
    }
  return m;
}

inline void run_block(Block* b, ThreadRes& r, int order) {
  const size_t ssize = config().stack_bytes;
  for (unsigned i = 0; i < b->n; ++i) {
    Fiber& f = r.fibers[i];
    f.state = St::Runnable;
    // Stagger the stack tops: equal offsets mod 4 KiB would make every fiber's hot frames compete
    // for the same few L1 cache sets.
    fiber_init(&f.ctx, r.stacks.stack_lo(i), ssize - (i * 7 % 64) * 64, fiber_main, &f);
  }
  for (unsigned wi = 0; wi < (b->n + 31) / 32; ++wi) {
    Warp& w = b->warps[wi];
    unsigned lanes = std::min(32u, b->n - wi * 32);
    w.alive = lanes == 32 ? ~0u : (1u << lanes) - 1;
    w.open = 0;
  }
  b->bar_arrived = 0, b->exited = 0;
  if (b->dyn_size) std::memset(b->dyn, 0xFF, b->dyn_size);  // poison: read-before-write shows up
#ifndef FTFM_EMU_ASAN  // (under ASan the bytes behind it are poisoned instead)
  std::memset(b->dyn + b->dyn_size, 0xA5, kCanary);
#endif
  for (unsigned i = 0; i < b->n; ++i) r.order[i] = order == kReverse ? b->n - 1 - i : i;
  while (b->exited < b->n && b->error.empty()) {
    if (order == kRandom)  // Fisher-Yates, a fresh permutation every round
      for (unsigned i = b->n - 1; i > 0; --i) std::swap(r.order[i], r.order[next_rand(r.rng) % (i + 1)]);
    bool ran = false;
    for (unsigned k = 0; k < b->n && b->error.empty(); ++k) {
      Fiber* f = &r.fibers[r.order[k]];
      if (f->state != St::Runnable) continue;
      ran = true;
      ++r.stats.switches;
      t_cur = f;
      fiber_resume(&b->sched, &f->ctx);
      t_cur = nullptr;
    }
    if (!ran && b->error.empty()) {
      Fiber* first = nullptr;
      for (unsigned i = 0; i < b->n && !first; ++i)
        if (r.fibers[i].state != St::Done) first = &r.fibers[i];
      set_error(deadlock_message(b), first);
    }
  }
#ifndef FTFM_EMU_ASAN
  if (b->error.empty())
    for (size_t i = 0; i < kCanary; ++i)
      if (b->dyn[b->dyn_size + i] != 0xA5) {
        set_error("write past the end of the " + std::to_string(b->dyn_size) + "-byte dynamic shared memory (byte +" +
                  std::to_string(i) + ")", nullptr);
        break;
      }
#endif
}

inline void run_launch(const char* name, const void* kfn, dim3 grid, dim3 block, size_t dyn_smem,
                       void (*body)(void*), void* ctx) {
  auto fail = [&](const std::string& what) { throw std::runtime_error(kernel_label(name, kfn) + ": " + what); };
  if (t_blk) fail("launch from inside a kernel is not supported");
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    fail("illegal block size " + xyz(block) + " (" + std::to_string(nthreads) + " threads; CUDA allows 1..1024, z <= 64)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    fail("illegal grid size " + xyz(grid));
  if (dyn_smem > 227u * 1024)  // the sm_90 opt-in maximum; above 48 KiB a GPU launch also needs the opt-in
    fail(std::to_string(dyn_smem) + " bytes of dynamic shared memory exceed 227 KiB");
  const unsigned n = unsigned(nthreads), nwarps = (n + 31) / 32;

  ThreadRes& r = res();
  if (!r.stacks.ensure(n, config().stack_bytes)) fail("cannot map " + std::to_string(n) + " fiber stacks");
  if (r.fibers.size() < n) r.fibers.resize(n);
  if (r.warps.size() < nwarps) r.warps.resize(nwarps);
  if (r.order.size() < n) r.order.resize(n);
  const size_t need = (dyn_smem + 15) / 16 * 16 + kCanary;
  if (r.dyn_cap < need) {
    std::free(r.dyn);
    r.dyn_cap = std::max(need, size_t(4096));
    r.dyn = static_cast<unsigned char*>(std::aligned_alloc(64, (r.dyn_cap + 63) / 64 * 64));
    if (!r.dyn) throw std::bad_alloc();
  }
#ifdef FTFM_EMU_ASAN  // reads outside [dyn, dyn + dyn_smem) are reported by ASan
  ASAN_UNPOISON_MEMORY_REGION(r.dyn, r.dyn_cap);
  ASAN_POISON_MEMORY_REGION(r.dyn + dyn_smem, r.dyn_cap - dyn_smem);
#endif
  Block b;
  b.name = name, b.kfn = kfn, b.grid = grid, b.bdim = block, b.n = n;
  b.fibers = r.fibers.data(), b.warps = r.warps.data(), b.body = body, b.ctx = ctx;
  b.dyn = r.dyn, b.dyn_size = dyn_smem;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.id = i, f.tid = tid_of(&b, i), f.warp = i / 32, f.lane = i % 32;
  }
  const int order = config().order.load();
  r.rng = config().seed.load() ^ (0x2545F4914F6CDD1Dull * (r.stats.launches + 1));
  ++r.stats.launches;
  struct Reset {  // leave no state behind, however we leave
    ThreadRes& r;
    ~Reset() {
      t_blk = nullptr, t_cur = nullptr;
#ifdef FTFM_EMU_ASAN
      ASAN_UNPOISON_MEMORY_REGION(r.dyn, r.dyn_cap);
#endif
    }
  } reset{r};
  t_blk = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.bid = make_uint3(x, y, z);
        ++r.stats.blocks;
        r.stats.threads += n;
        run_block(&b, r, order);
        if (!b.error.empty()) throw std::runtime_error(b.error);
      }
}

}  // namespace detail

// ------------------------------------------------------------------------------ public API
// Runs kernel(args...) over grid x block. Arguments are converted to the kernel's parameter types
// once; every thread then gets its own copy (as CUDA passes kernel parameters by value).
template <class... KArgs, class... Args>
void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dyn_smem, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "FTFM_LAUNCH: wrong number of kernel arguments");
  struct Call {
    void (*k)(KArgs...);
    std::tuple<std::decay_t<KArgs>...> a;
  } call{kernel, std::tuple<std::decay_t<KArgs>...>(std::forward<Args>(args)...)};
  auto body = [](void* p) {
    Call* c = static_cast<Call*>(p);
    std::apply(c->k, c->a);
  };
  detail::run_launch(name, reinterpret_cast<const void*>(kernel), grid, block, dyn_smem, body, &call);
}

// The running block's dynamic shared memory (what FTFM_DYNAMIC_SMEM points at).
inline void* dynamic_smem() {
  if (!detail::t_blk) throw std::logic_error("ftfm_emu: dynamic shared memory used outside a kernel");
  return detail::t_blk->dyn;
}

// Run order of the threads of a block, for all OS threads: kForward, kReverse or kRandom(seed).
inline void set_order(int order, uint64_t seed = 0) {
  if (order < kForward || order > kRandom) throw std::invalid_argument("ftfm_emu::set_order: order must be 0, 1 or 2");
  detail::config().order = order;
  detail::config().seed = seed;
}
inline int get_order() { return detail::config().order.load(); }
inline const Stats& stats() { return detail::res().stats; }
inline void reset_stats() { detail::res().stats = Stats(); }

}  // namespace ftfm_emu

// ================================================================================ CUDA built-ins
#define threadIdx (static_cast<const uint3&>(::ftfm_emu::detail::t_cur->tid))
#define blockIdx (static_cast<const uint3&>(::ftfm_emu::detail::t_blk->bid))
#define blockDim (static_cast<const dim3&>(::ftfm_emu::detail::t_blk->bdim))
#define gridDim (static_cast<const dim3&>(::ftfm_emu::detail::t_blk->grid))
constexpr int warpSize = 32;

// Call sites come from __builtin_FILE/__builtin_LINE default arguments, evaluated at the caller.
#define FTFM_EMU_SITE const char *ftfm_file_ = __builtin_FILE(), int ftfm_line_ = __builtin_LINE()
#define FTFM_EMU_AT ftfm_file_, ftfm_line_
inline void __syncthreads(FTFM_EMU_SITE) { ::ftfm_emu::detail::sync_block(0, 0, FTFM_EMU_AT); }
inline int __syncthreads_count(int p, FTFM_EMU_SITE) { return ::ftfm_emu::detail::sync_block(1, p, FTFM_EMU_AT); }
inline int __syncthreads_and(int p, FTFM_EMU_SITE) {
  return ::ftfm_emu::detail::sync_block(2, p, FTFM_EMU_AT) == int(::ftfm_emu::detail::t_blk->n);
}
inline int __syncthreads_or(int p, FTFM_EMU_SITE) { return ::ftfm_emu::detail::sync_block(3, p, FTFM_EMU_AT) != 0; }

inline void __syncwarp(unsigned mask = 0xffffffffu, FTFM_EMU_SITE) {
  ::ftfm_emu::detail::warp_op(::ftfm_emu::detail::kSyncwarp, mask, 0, 0, 32, FTFM_EMU_AT);
}
#define FTFM_EMU_SHFL(NAME, OP)                                                                             \
  template <class T>                                                                                        \
  inline T NAME(unsigned mask, T var, int arg, int width = 32, FTFM_EMU_SITE) {                             \
    using namespace ::ftfm_emu::detail;                                                                     \
    return from_bits<T>(warp_op(OP, mask, to_bits(var), arg, width, FTFM_EMU_AT));                         \
  }
FTFM_EMU_SHFL(__shfl_sync, kShfl)
FTFM_EMU_SHFL(__shfl_up_sync, kShflUp)
FTFM_EMU_SHFL(__shfl_down_sync, kShflDown)
FTFM_EMU_SHFL(__shfl_xor_sync, kShflXor)
#undef FTFM_EMU_SHFL
inline unsigned __ballot_sync(unsigned mask, int p, FTFM_EMU_SITE) {
  return unsigned(::ftfm_emu::detail::warp_op(::ftfm_emu::detail::kBallot, mask, p != 0, 0, 32, FTFM_EMU_AT));
}
inline int __any_sync(unsigned mask, int p, FTFM_EMU_SITE) {
  return int(::ftfm_emu::detail::warp_op(::ftfm_emu::detail::kAny, mask, p != 0, 0, 32, FTFM_EMU_AT));
}
inline int __all_sync(unsigned mask, int p, FTFM_EMU_SITE) {
  return int(::ftfm_emu::detail::warp_op(::ftfm_emu::detail::kAll, mask, p != 0, 0, 32, FTFM_EMU_AT));
}
// Lanes of the caller's warp that exist and have not exited (hardware may report fewer).
inline unsigned __activemask() { return ::ftfm_emu::detail::t_blk->warps[::ftfm_emu::detail::t_cur->warp].alive; }
[[noreturn]] inline void __trap() {
  ::ftfm_emu::detail::set_error("__trap() called");
  ::ftfm_emu::detail::abort_fiber();
}
// Atomics, math, conversions, integer intrinsics, min/max.
#include "simt_intrinsics.h"

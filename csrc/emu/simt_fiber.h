// csrc/emu/simt_fiber.h -- fibers for the SIMT emulator (csrc/emu/simt.h): stacks and context switches.
//
// A fiber is a stack plus a saved context. The scheduler (running on the OS thread's own stack)
// resumes a fiber with fiber_resume(); the fiber runs until it calls fiber_yield(), which returns to
// the scheduler. A new fiber starts in entry(arg), which must never return: it ends with a final
// fiber_yield(..., exiting = true) and is never resumed again.
//
// x86-64: a hand-written switch saves the callee-saved registers (rbx, rbp, r12-r15) and the MXCSR
// and x87 control words on the old stack and swaps rsp: a few nanoseconds, no system call.
// Elsewhere (or with -DFTFM_EMU_UCONTEXT): ucontext, which costs a sigprocmask system call per switch.
// ASan builds annotate every switch (__sanitizer_start/finish_switch_fiber), so stack-use checks stay
// valid on fiber stacks.
#pragma once
#ifndef FTFM_EMU_SIMT_CORE
#error "include csrc/emu/simt.h (through ftfm_cuda.h), not this file"
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#if !defined(__x86_64__) && !defined(FTFM_EMU_UCONTEXT)
#define FTFM_EMU_UCONTEXT 1
#endif
#ifdef FTFM_EMU_UCONTEXT
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define FTFM_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FTFM_EMU_ASAN 1
#endif
#endif
#ifdef FTFM_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace ftfm_emu {
namespace detail {

struct FiberCtx {
  void* sp = nullptr;  // saved stack pointer while switched out (also kept after the fiber ends)
#ifdef FTFM_EMU_UCONTEXT
  ucontext_t uc;
#endif
  char* stack_lo = nullptr;  // usable stack [stack_lo, stack_lo + stack_size); guard page below
  size_t stack_size = 0;
  void* fake_stack = nullptr;  // ASan bookkeeping
  void (*entry)(void*) = nullptr;
  void* arg = nullptr;
};

struct SchedCtx {  // the scheduler side: the OS thread's own stack
  void* sp = nullptr;
#ifdef FTFM_EMU_UCONTEXT
  ucontext_t uc;
#endif
  const void* stack_lo = nullptr;  // ASan: bounds of the OS thread's stack, learnt on each switch
  size_t stack_size = 0;
};

// mmap'd stacks with a PROT_NONE guard page below each (an overflow faults instead of corrupting).
// One pool per OS thread; a block's thread i always uses stack i, so stacks are reused by every block
// and launch on that OS thread.
struct StackPool {
  std::vector<std::pair<char*, size_t>> maps;
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  bool ensure(size_t n, size_t stack_bytes) {  // false when the kernel refuses memory
    while (maps.size() < n) {
      void* p = mmap(nullptr, stack_bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) return false;
      mprotect(p, page, PROT_NONE);
      maps.emplace_back(static_cast<char*>(p), stack_bytes + page);
    }
    return true;
  }
  char* stack_lo(size_t i) const { return maps[i].first + page; }
  ~StackPool() {
    for (auto& m : maps) munmap(m.first, m.second);
  }
};

#ifndef FTFM_EMU_UCONTEXT
// ftfm_emu_switch(save, load): push the callee-saved registers and the FP control words, store rsp
// in *save, set rsp = load, restore the other context's registers and return into it. A new fiber's
// stack is laid out so that this `ret` lands in ftfm_emu_trampoline with r12 = arg, r13 = entry.
// COMDAT sections let several objects include this header.
extern "C" void ftfm_emu_switch(void** save, void* load);
extern "C" void ftfm_emu_trampoline();
asm(R"(
  .pushsection .text.ftfm_emu_switch,"axG",@progbits,ftfm_emu_switch,comdat
  .weak ftfm_emu_switch
  .hidden ftfm_emu_switch
  .type ftfm_emu_switch, @function
ftfm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsp, %rdx
  movq %rsi, %rsp
  movl (%rsp), %eax       # reload MXCSR / x87 control word only when they differ (the loads are slow)
  cmpl %eax, (%rdx)
  je 1f
  ldmxcsr (%rsp)
1:
  movw 4(%rsp), %ax
  cmpw %ax, 4(%rdx)
  je 2f
  fldcw 4(%rsp)
2:
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ftfm_emu_switch, .-ftfm_emu_switch
  .popsection
  .pushsection .text.ftfm_emu_trampoline,"axG",@progbits,ftfm_emu_trampoline,comdat
  .weak ftfm_emu_trampoline
  .hidden ftfm_emu_trampoline
  .type ftfm_emu_trampoline, @function
ftfm_emu_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size ftfm_emu_trampoline, .-ftfm_emu_trampoline
  .popsection
)");

inline void ctx_prepare(FiberCtx* f) {
  uint64_t* s = reinterpret_cast<uint64_t*>(uintptr_t(f->stack_lo + f->stack_size) & ~uintptr_t(15));
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  s[-1] = uint64_t(&ftfm_emu_trampoline);  // return address of the first switch (rsp 16-aligned after it)
  s[-2] = 0;                               // rbp: 0 ends frame-pointer walks
  s[-3] = 0;                               // rbx
  s[-4] = uint64_t(f->arg);                // r12 -> rdi
  s[-5] = uint64_t(f->entry);              // r13 -> called
  s[-6] = 0;                               // r14
  s[-7] = 0;                               // r15
  s[-8] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  f->sp = &s[-8];
}
inline void ctx_to_fiber(SchedCtx* s, FiberCtx* f) { ftfm_emu_switch(&s->sp, f->sp); }
inline void ctx_to_sched(FiberCtx* f, SchedCtx* s) { ftfm_emu_switch(&f->sp, s->sp); }
#else
inline thread_local FiberCtx* t_starting = nullptr;  // makecontext cannot portably pass a pointer
inline void uc_entry() {
  FiberCtx* f = t_starting;
  f->entry(f->arg);
}
inline void ctx_prepare(FiberCtx* f) {
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, uc_entry, 0);
}
inline void ctx_to_fiber(SchedCtx* s, FiberCtx* f) {
  t_starting = f;
  swapcontext(&s->uc, &f->uc);
}
inline void ctx_to_sched(FiberCtx* f, SchedCtx* s) {
  f->sp = __builtin_frame_address(0);
  swapcontext(&f->uc, &s->uc);
}
#endif

// Makes f start entry(arg) on [lo, lo + size) at its next resume.
inline void fiber_init(FiberCtx* f, char* lo, size_t size, void (*entry)(void*), void* arg) {
#ifdef FTFM_EMU_ASAN  // the previous fiber on this stack may have left poisoned frames above its last sp
  if (f->sp && f->stack_lo == lo) {
    char* from = std::max(lo, static_cast<char*>(f->sp) - 256);
    ASAN_UNPOISON_MEMORY_REGION(from, size_t(lo + size - from));
  }
#endif
  f->stack_lo = lo, f->stack_size = size, f->entry = entry, f->arg = arg, f->fake_stack = nullptr;
  ctx_prepare(f);
}

// Scheduler -> fiber; returns when the fiber yields.
inline void fiber_resume(SchedCtx* s, FiberCtx* f) {
#ifdef FTFM_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->stack_lo, f->stack_size);
  ctx_to_fiber(s, f);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  ctx_to_fiber(s, f);
#endif
}

// First call of a fiber's entry function (ASan learns the scheduler's stack here).
inline void fiber_started(SchedCtx* s) {
#ifdef FTFM_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s->stack_lo, &s->stack_size);
#else
  (void)s;
#endif
}

// Fiber -> scheduler; returns when resumed (never, when exiting).
inline void fiber_yield(FiberCtx* f, SchedCtx* s, bool exiting) {
#ifdef FTFM_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, s->stack_lo, s->stack_size);
  ctx_to_sched(f, s);
  __sanitizer_finish_switch_fiber(f->fake_stack, &s->stack_lo, &s->stack_size);
#else
  (void)exiting;
  ctx_to_sched(f, s);
#endif
}

}  // namespace detail
}  // namespace ftfm_emu

// csrc/emu/simt_intrinsics.h -- CUDA device intrinsics that are plain functions on the CPU:
// atomics, fast-math and rounding variants, conversions and bit casts, integer intrinsics, and the
// min/max overloads CUDA declares. Included at the end of simt.h (needs its to_bits/from_bits);
// the thread-model built-ins (__syncthreads, shuffles, votes) are in simt.h itself.
#pragma once
#ifndef FTFM_EMU_SIMT_CORE
#error "include csrc/emu/simt.h (through ftfm_cuda.h), not this file"
#endif

// ---- memory fences are no-ops (one OS thread runs a block); cache-hinted accesses are plain ----
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned) {}

// Cache-hinted loads and stores are plain accesses.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---- atomics: real atomic RMWs (blocks of different launches may run on different OS threads) ----
namespace ftfm_emu {
namespace detail {
template <class T, class F>
inline T atomic_rmw(T* p, F f) {  // CAS loop on the bit pattern (floats, min/max, inc/dec)
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  U* up = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(up, __ATOMIC_RELAXED);
  for (;;) {
    T o = from_bits<T>(old), n = f(o);
    U nu = U(to_bits(n));
    if (__atomic_compare_exchange_n(up, &old, nu, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return o;
  }
}
}  // namespace detail
}  // namespace ftfm_emu
#define FTFM_EMU_ATOMIC_INT(T)                                                                           \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                  \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }                  \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                  \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                    \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                  \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                \
  inline T atomicCAS(T* p, T cmp, T v) {                                                                \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);                 \
    return cmp;                                                                                          \
  }                                                                                                      \
  inline T atomicMax(T* p, T v) { return ::ftfm_emu::detail::atomic_rmw(p, [v](T o) { return o < v ? v : o; }); } \
  inline T atomicMin(T* p, T v) { return ::ftfm_emu::detail::atomic_rmw(p, [v](T o) { return v < o ? v : o; }); }
FTFM_EMU_ATOMIC_INT(int)
FTFM_EMU_ATOMIC_INT(unsigned int)
FTFM_EMU_ATOMIC_INT(unsigned long long)
FTFM_EMU_ATOMIC_INT(long long)
#undef FTFM_EMU_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
inline float atomicAdd(float* p, float v) { return ::ftfm_emu::detail::atomic_rmw(p, [v](float o) { return o + v; }); }
inline double atomicAdd(double* p, double v) { return ::ftfm_emu::detail::atomic_rmw(p, [v](double o) { return o + v; }); }
// fp16/bf16 adds round once per add, like the hardware's (sm_70+ half, sm_80+ bf16).
inline __half atomicAdd(__half* p, __half v) { return ::ftfm_emu::detail::atomic_rmw(p, [v](__half o) { return __hadd(o, v); }); }
inline __half2 atomicAdd(__half2* p, __half2 v) { return ::ftfm_emu::detail::atomic_rmw(p, [v](__half2 o) { return __hadd2(o, v); }); }
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return ::ftfm_emu::detail::atomic_rmw(p, [v](__nv_bfloat16 o) { return __hadd(o, v); });
}
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* p, __nv_bfloat162 v) {
  return ::ftfm_emu::detail::atomic_rmw(p, [v](__nv_bfloat162 o) { return __hadd2(o, v); });
}
inline float atomicExch(float* p, float v) { return ::ftfm_emu::detail::atomic_rmw(p, [v](float) { return v; }); }
inline unsigned atomicInc(unsigned* p, unsigned lim) {
  return ::ftfm_emu::detail::atomic_rmw(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned lim) {
  return ::ftfm_emu::detail::atomic_rmw(p, [lim](unsigned o) { return (o == 0 || o > lim) ? lim : o - 1; });
}

// ---- math intrinsics: fast-math variants map to the accurate C functions (compare with tolerances) ----
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x), *c = cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __saturatef(float x) { return !(x > 0.0f) ? 0.0f : (x > 1.0f ? 1.0f : x); }

// ---- conversions and bit casts (float -> int saturates and maps NaN to 0, as on the GPU) ----
namespace ftfm_emu {
namespace detail {
template <class I, class F>
inline I sat_cast(F v) {
  if (v != v) return I(0);
  if (v <= F(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (v >= F(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return I(v);
}
}  // namespace detail
}  // namespace ftfm_emu
inline int __float2int_rn(float x) { return ::ftfm_emu::detail::sat_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return ::ftfm_emu::detail::sat_cast<int>(truncf(x)); }
inline int __float2int_rd(float x) { return ::ftfm_emu::detail::sat_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return ::ftfm_emu::detail::sat_cast<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return ::ftfm_emu::detail::sat_cast<unsigned>(nearbyintf(x)); }
inline long long __float2ll_rn(float x) { return ::ftfm_emu::detail::sat_cast<long long>(nearbyintf(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __ll2float_rn(long long x) { return float(x); }
inline float __double2float_rn(double x) { return float(x); }
inline int __float_as_int(float x) { return ::ftfm_emu::detail::from_bits<int>(::ftfm_emu::detail::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return ::ftfm_emu::detail::from_bits<unsigned>(::ftfm_emu::detail::to_bits(x)); }
inline float __int_as_float(int x) { return ::ftfm_emu::detail::from_bits<float>(::ftfm_emu::detail::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::ftfm_emu::detail::from_bits<float>(::ftfm_emu::detail::to_bits(x)); }
inline long long __double_as_longlong(double x) { return ::ftfm_emu::detail::from_bits<long long>(::ftfm_emu::detail::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ::ftfm_emu::detail::from_bits<double>(::ftfm_emu::detail::to_bits(x)); }

// ---- integer intrinsics ----
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline int __mul24(int a, int b) { return int(((long long)(a << 8 >> 8)) * (b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return int(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned(((unsigned long long)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  return unsigned(((((unsigned long long)hi << 32) | lo) << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  return unsigned((((unsigned long long)hi << 32) | lo) >> (s & 31));
}

// ---- min/max: the same overload set CUDA declares (float ones are fminf/fmaxf) ----
#define FTFM_EMU_MINMAX(R, A, B, MIN, MAX)                             \
  inline R min(A a, B b) { return MIN; }                               \
  inline R max(A a, B b) { return MAX; }
#define FTFM_EMU_MINMAX_INT(R, A, B) \
  FTFM_EMU_MINMAX(R, A, B, static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b), \
                  static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b))
FTFM_EMU_MINMAX_INT(int, int, int)
FTFM_EMU_MINMAX_INT(unsigned, unsigned, unsigned)
FTFM_EMU_MINMAX_INT(unsigned, int, unsigned)
FTFM_EMU_MINMAX_INT(unsigned, unsigned, int)
FTFM_EMU_MINMAX_INT(long, long, long)
FTFM_EMU_MINMAX_INT(unsigned long, unsigned long, unsigned long)
FTFM_EMU_MINMAX_INT(unsigned long, long, unsigned long)
FTFM_EMU_MINMAX_INT(unsigned long, unsigned long, long)
FTFM_EMU_MINMAX_INT(long long, long long, long long)
FTFM_EMU_MINMAX_INT(unsigned long long, unsigned long long, unsigned long long)
FTFM_EMU_MINMAX_INT(unsigned long long, long long, unsigned long long)
FTFM_EMU_MINMAX_INT(unsigned long long, unsigned long long, long long)
FTFM_EMU_MINMAX(float, float, float, fminf(a, b), fmaxf(a, b))
FTFM_EMU_MINMAX(double, double, double, fmin(a, b), fmax(a, b))
FTFM_EMU_MINMAX(double, float, double, fmin(a, b), fmax(a, b))
FTFM_EMU_MINMAX(double, double, float, fmin(a, b), fmax(a, b))
#undef FTFM_EMU_MINMAX_INT
#undef FTFM_EMU_MINMAX
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

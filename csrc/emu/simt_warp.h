// csrc/emu/simt_warp.h -- warp collectives of the SIMT emulator: the per-warp exchange slots behind
// __shfl_*_sync, __ballot_sync/__any_sync/__all_sync and __syncwarp, with their mask, width and
// same-call-site checks. Part of ftfm_emu::detail; included by simt.h between the barrier code and
// the scheduler (it uses Block/Warp/Coll and the error helpers defined before it).
#pragma once
#ifndef FTFM_EMU_SIMT_CORE
#error "include csrc/emu/simt.h (through ftfm_cuda.h), not this file"
#endif

namespace ftfm_emu {
namespace detail {

// ------------------------------------------------------------------------------ warp collectives
inline void complete(Block* b, Warp& w, unsigned slot, unsigned base) {
  Coll& c = w.slots[slot];
  unsigned ballot = 0;
  if (c.op >= kBallot && c.op <= kAll)
    for (unsigned l = 0; l < 32; ++l)
      if ((c.mask >> l & 1) && b->fibers[base + l].cval) ballot |= 1u << l;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(c.mask >> l & 1)) continue;
    Fiber& f = b->fibers[base + l];
    if (c.op <= kShflXor) {  // PTX shfl.sync: segment of `width` lanes, out-of-segment -> own value
      const int lane = int(l), bv = f.carg & 31, seg = (32 - f.cwidth) & 31;
      const int cv = c.op == kShflUp ? 0 : 31, maxl = (lane & seg) | (cv & ~seg), minl = lane & seg;
      int j = lane;
      bool ok = false;
      switch (c.op) {
        case kShflUp: j = lane - bv, ok = j >= maxl; break;
        case kShflDown: j = lane + bv, ok = j <= maxl; break;
        case kShflXor: j = lane ^ bv, ok = j <= maxl; break;
        default: j = minl | (bv & ~seg), ok = j <= maxl; break;
      }
      if (!ok) j = lane;
      f.cres = (c.mask >> j & 1) ? b->fibers[base + j].cval : ~uint64_t(0);  // not in mask: poison
    } else if (c.op == kBallot) {
      f.cres = ballot;
    } else if (c.op == kAny) {
      f.cres = ballot != 0;
    } else if (c.op == kAll) {
      f.cres = ballot == c.mask;
    } else {
      f.cres = 0;
    }
    f.state = St::Runnable;
  }
  w.open &= ~(1u << slot);
}

enum WarpErr { kNotSelf, kGone, kWidth, kOtherMask, kOtherCall };
[[gnu::cold, gnu::noinline]] inline std::string warp_message(WarpErr why, int op, unsigned mask, int width,
                                                           const char* file, int line, const Coll* s) {
  Block* b = t_blk;
  Fiber* f = t_cur;
  const std::string call = std::string(op_name(op)) + " at " + site(file, line);
  const std::string bad = "bad shuffle mask " + hex(mask) + " in " + call + ": ";
  switch (why) {
    case kNotSelf: return bad + "the calling lane " + std::to_string(f->lane) + " is not in its own mask";
    case kGone:
      return bad + "lanes " + hex(mask & ~b->warps[f->warp].alive) + " have exited or do not exist (blockDim has " +
             std::to_string(b->n) + " threads)";
    case kWidth: return "bad shuffle width " + std::to_string(width) + " in " + call + " (must be a power of 2 <= 32)";
    case kOtherMask:
      return bad + "lanes " + hex(s->arrived) + " wait with mask " + hex(s->mask) + " at " + op_name(s->op) + " (" +
             site(s->file, s->line) + ")";
    default:
      return "divergent warp collective (mask " + hex(mask) + "): " + call + " while lanes " + hex(s->arrived) +
             " wait at " + op_name(s->op) + " at " + site(s->file, s->line);
  }
}
[[noreturn, gnu::cold, gnu::noinline]] inline void warp_error(WarpErr why, int op, unsigned mask, int width,
                                                             const char* file, int line, const Coll* s) {
  set_error(warp_message(why, op, mask, width, file, line, s));
  abort_fiber();
}

// One lane arrives at a warp collective. The last lane of the mask to arrive computes everyone's
// result and carries on; the others wait (switch out) until then.
inline uint64_t warp_op(int op, unsigned mask, uint64_t val, int arg, int width, const char* file, int line) {
  Block* b = t_blk;
  Fiber* f = t_cur;
  if (!f) throw std::logic_error(std::string("ftfm_emu: ") + op_name(op) + " called outside a kernel");
  Warp& w = b->warps[f->warp];
  const unsigned me = 1u << f->lane;
  if (!(mask & me)) warp_error(kNotSelf, op, mask, width, file, line, nullptr);
  if (mask & ~w.alive) warp_error(kGone, op, mask, width, file, line, nullptr);
  if (op <= kShflXor && (width < 1 || width > 32 || (width & (width - 1))))
    warp_error(kWidth, op, mask, width, file, line, nullptr);
  unsigned slot = 32;
  for (unsigned m = w.open; m; m &= m - 1) {
    const Coll& s = w.slots[__builtin_ctz(m)];
    if (!(s.mask & mask)) continue;
    if (s.mask != mask) warp_error(kOtherMask, op, mask, width, file, line, &s);
    if (s.op != op || !same_site(s.file, s.line, file, line)) warp_error(kOtherCall, op, mask, width, file, line, &s);
    slot = __builtin_ctz(m);
    break;
  }
  Coll* c = &w.slots[slot == 32 ? __builtin_ctz(~w.open) : slot];
  if (slot == 32) {  // first lane of a new collective
    slot = unsigned(c - w.slots);
    w.open |= 1u << slot;
    c->op = uint8_t(op), c->mask = mask, c->arrived = 0, c->file = file, c->line = line;
  }
  f->cval = val, f->carg = arg, f->cwidth = width, f->file = file, f->line = line;
  c->arrived |= me;
  if (c->arrived != mask) {
    f->state = St::AtWarp;
    switch_out(f, false);
  } else {
    complete(b, w, slot, f->warp * 32);
  }
  return f->cres;
}

// Values travel as raw bytes (__half2 & co. are not formally trivially copyable, but are plain bits).
template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, static_cast<const void*>(&v), sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(static_cast<void*>(&v), &u, sizeof(T));
  return v;
}

}  // namespace detail
}  // namespace ftfm_emu

"""Helpers shared by the attention kernels (``attention.py``, ``attention_bwd.py``,
``attention_decode.py``): config types and table helpers, architecture classes, canonical
strides, launching and autotuning, the static report's signatures, mask bounds and tile ranges,
row loads/stores, score modifiers (softcap, ALiBi), dropout's Philox counters and the debug
dropout-mask kernel. The masking rules and numerics are described in ``kernels/attention.py``.

This module imports no other attention module: forward, backward and decode import it, and the
static report's case list (``attention_aot.py``) imports all of them.
"""
import os
import re
import time
from collections import namedtuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
UNBOUNDED = 1 << 30  # window side with no limit (kept < 2**31 after adding positions)

__all__ = ["score_args", "dropout_args", "dropout_mask", "TRITON_VERSION", "TRITON_36", "TRITON_37", "BEFORE_38",
           "replace_configs", "AttnConfig", "LOG2E", "UNBOUNDED", "block_d", "autotune_enabled",
           "canonical_strides", "lse_strides", "aot_signature", "aot_attrs", "mask_args"]

AttnConfig = namedtuple("AttnConfig", "BLOCK_M BLOCK_N num_warps num_stages")


# -- configs per Triton version ----------------------------------------------------------------
def _version(text):
    """(major, minor) of a version string such as "3.6.0" or "3.8.0+git1234"."""
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


TRITON_VERSION = _version(triton.__version__)
# The config tables in attention.py / attention_bwd.py / attention_decode.py are spill-checked on
# Triton 3.8 (sm_90's order timed on an H200 with 3.6, see attention_bwd.py's MEASURED_SPILLS for the
# one measured exception). Older code generation needs more registers for some, so each module swaps
# the configs that spill there for spill-free ones, measured with the static report
# (``python -m fasttfm aot --only triton``) on Triton 3.6.0 and 3.7.1:
TRITON_36 = TRITON_VERSION < (3, 7)  # swaps only 3.6 needs
TRITON_37 = TRITON_VERSION[:2] == (3, 7)  # swaps only 3.7 needs
BEFORE_38 = TRITON_VERSION < (3, 8)  # swaps both need


def replace_configs(table, replacements):
    """A copy of a config table with configs replaced, per architecture key and head-dim bucket.

    table: {arch: [(max_d, [configs])]} (the tuning lists) or {arch: {bucket: config}} (the
    modifier tables); replacements: {arch: {bucket: {old config: new config}}}. The copy shares
    no list with ``table`` (the tables of one arch class are often built from another's). A
    replacement whose old config is not in the table raises: the tables and their overrides must
    not drift apart silently."""
    out = {}
    for arch, entry in table.items():
        rep = replacements.get(arch, {})
        if isinstance(entry, dict):
            new = dict(entry)
            for bucket, swaps in rep.items():
                for old, cfg in swaps.items():
                    if new[bucket] != old:
                        raise ValueError(f"replace_configs: {old} is not sm_{arch}'s d{bucket} config")
                    new[bucket] = cfg
        else:
            new = []
            for max_d, cfgs in entry:
                swaps = rep.get(max_d, {})
                missing = [old for old in swaps if old not in cfgs]
                if missing:
                    raise ValueError(f"replace_configs: {missing} not in sm_{arch}'s d{max_d} list")
                new.append((max_d, [swaps.get(c, c) for c in cfgs]))
        out[arch] = new
    return out


# -- architecture classes and config-table helpers ---------------------------------------------
def _arch(cc):
    """Config table of compute capability ``cc``: 9 (sm_90/sm_100: up to 227 KiB of shared memory per
    block), 86 (sm_86, sm_89, sm_12x: 99 KiB) or 8 (sm_80, sm_87: 163 KiB)."""
    if cc in (86, 89) or cc >= 120:
        return 86
    return 9 if cc >= 90 else 8


def block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _bucket(table, head_dim):
    bd = block_d(head_dim)
    for max_d, cfgs in table:
        if bd <= max_d:
            return cfgs
    raise ValueError(f"head dim {head_dim} > 256 is not supported")


def _bucket_dim(head_dim):
    bd = block_d(head_dim)
    return 64 if bd <= 64 else 128 if bd <= 128 else 256


def autotune_enabled():
    return os.environ.get("FASTTFM_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


# -- canonical views and launching ----------------------------------------------------------------
def canonical_strides(t, varlen=False):
    """(stride_b, stride_h, stride_n) of a canonical 4-D (B, H, N, D) view with unit last stride;
    varlen (1, H, total, D) views get stride_b = 0 (sequences are located by cu_seqlens)."""
    assert t.stride(-1) == 1 or t.shape[-1] == 1, "last dim must have stride 1"
    return 0 if varlen else t.stride(0), t.stride(1), t.stride(2)


def _input_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def lse_strides(lse, varlen):
    """(stride_b, stride_h) of LSE/Delta: (B, H, Nq) dense, (H, total_q) varlen."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _cc(t):
    """Compute capability whose tuning lists apply to ``t``'s device. CPU tensors (the interpreter)
    have none: FASTTFM_EMULATE_ARCH (default 80) says whose lists autotuning under emulation uses."""
    if t.device.type != "cuda":
        return int(os.environ.get("FASTTFM_EMULATE_ARCH", "80"))
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


_AUTOTUNED = {}


def _wall_clock_bench(fn, quantiles=None, **_):
    """Autotuning under the interpreter: one wall-clock run of a config (CPU time, not GPU time;
    the point is to execute every config through triton.autotune's own launch path)."""
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def _autotuned(kernel, cfgs, interpret=False):
    """triton.autotune wrapper of ``kernel`` over ``cfgs`` (FASTTFM_AUTOTUNE=1). ``interpret``: the
    same wrapper around the kernel's interpreted twin, timed by the wall clock."""
    key = (kernel, tuple(cfgs), interpret)
    if key not in _AUTOTUNED:
        tc = [triton.Config({"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N}, num_warps=c.num_warps,
                            num_stages=c.num_stages) for c in cfgs]
        fn = kernel
        if interpret:
            from ._interp import interpreted

            fn = interpreted(kernel)
        _AUTOTUNED[key] = triton.autotune(tc, key=["seqlen_q", "seqlen_k", "HEAD_DIM", "HEAD_DIM_V", "CHUNKED",
                                                   "VARLEN", "win_left", "win_right", "SOFTCAP", "ALIBI", "DROPOUT",
                                                   "KPAD", "SEQUSED", "SEGMENTS"],
                                          do_bench=_wall_clock_bench if interpret else None)(fn)
    return _AUTOTUNED[key]


# -- static report -----------------------------------------------------------------------------
_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


_CONSTEXPRS = {"HEAD_DIM", "BLOCK_D", "HEAD_DIM_V", "BLOCK_DV", "BLOCK_M", "BLOCK_N", "CHUNKED", "VARLEN",
               "INPUT_PRECISION", "SOFTCAP", "ALIBI", "DROPOUT", "SPLIT", "BLOCK_S", "GQA_ROWS", "TMA", "KPAD",
               "SEQUSED", "SEGMENTS"}
_I32_PTRS = ("SeqLens", "SeqUsedK", "KBounds", "SegBounds")


def aot_case_parts(kernel, d, dv, dt, cfg, flags, **fixed):
    """(constexprs, signature, name body) of an attention AotCase: head dims d / dv (dv None: d), data type,
    tile config, constexpr overrides ``flags`` (named in the tag list) over the plain problem's defaults
    and ``fixed`` (kernel-specific constexprs, e.g. TMA). The name body is "dt,dims,bm..,bn..,w..,s..tags"."""
    dv = d if dv is None else dv
    cx = dict(HEAD_DIM=d, BLOCK_D=block_d(d), HEAD_DIM_V=dv, BLOCK_DV=block_d(dv), BLOCK_M=cfg.BLOCK_M,
              BLOCK_N=cfg.BLOCK_N, CHUNKED=False, VARLEN=False, INPUT_PRECISION="ieee" if dt == "fp32" else "tf32",
              SOFTCAP=False, ALIBI=False, DROPOUT=False, KPAD=False, SEQUSED=False, SEGMENTS=False, **fixed)
    cx.update(flags)
    tags = "".join(f",{k.lower()}" for k, val in flags.items() if val is True)
    dims = f"d{d}" if dv == d else f"d{d}v{dv}"
    body = f"{dt},{dims},bm{cfg.BLOCK_M},bn{cfg.BLOCK_N},w{cfg.num_warps},s{cfg.num_stages}{tags}"
    return cx, aot_signature(kernel, dt), body


def aot_signature(kernel, dt):
    """Triton signature of an attention kernel for data type ``dt`` ("fp16", "bf16", "fp32")."""
    sig = {}
    for name in kernel.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in ("Lse", "Delta", "Alibi") or name.startswith("Part"):
            sig[name] = "*fp32"
        elif name.startswith("CuSeq") or name in _I32_PTRS:
            sig[name] = "*i32"
        elif name == "KeyMask":
            sig[name] = "*i8"
        elif name[0].isupper():
            sig[name] = f"*{dt}"
        else:
            sig[name] = "fp32" if name.endswith("scale") or name in ("softcap", "dropout_p") else \
                "i64" if name == "seed" else "i32"
    return sig


_NO_DIV16 = ("stride_lb", "stride_lh", "stride_ab", "stride_pb", "stride_ph", "stride_pn", "stride_ps", "stride_mb",
             "stride_sb")


def aot_attrs(kernel, signature):
    """Divisibility-by-16 hints the JIT derives at launch: tensor pointers (torch allocations are
    16-byte aligned) and q/k/v/o/grad strides (multiples of 16 for head dims that are)."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
            if signature[n].startswith("*") or (n.startswith("stride_") and n not in _NO_DIV16)}


def _launch(kernel, grid, args, constexprs, cfg, interpret, autotune_configs=None):
    if autotune_configs is not None:  # an Autotuner (around the interpreted twin when interpreting)
        return kernel[grid](*args, **constexprs)
    if interpret:
        from ._interp import interpreted

        return interpreted(kernel)[grid](*args, **constexprs)
    return kernel[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# -- mask helpers (shared with kernels/attention_bwd.py) --------------------------------------
@triton.jit
def _floor_div(a, c):
    """floor(a / c) for c > 0 and a of any sign (integer ``//`` truncates toward zero)."""
    return tl.where(a >= 0, a // c, -((c - 1 - a) // c))


@triton.jit
def _row_bounds(rows, shift, win_left, win_right, chunk, CHUNKED: tl.constexpr):
    """First and last key index visible to query ``rows`` (scalar or vector), before clamping."""
    p = rows + shift
    lo = p - win_left
    hi = p + win_right
    if CHUNKED:
        start = _floor_div(p, chunk) * chunk
        lo = tl.maximum(lo, start)
        hi = tl.minimum(hi, start + chunk - 1)
    return lo, hi


@triton.jit
def _col_bounds(col_a, col_b, shift, win_left, win_right, chunk, CHUNKED: tl.constexpr):
    """Query rows i with hi(i) >= col_a (first) and lo(i) <= col_b (last), inverting _row_bounds.

    (col_a, col_b) = (first, last) column of a kv tile gives the rows that may see the tile;
    (last, first) gives the rows that see every column of it.
    """
    i_first = col_a - shift - win_right
    i_last = col_b - shift + win_left
    if CHUNKED:
        i_first = tl.maximum(i_first, _floor_div(col_a, chunk) * chunk - shift)
        i_last = tl.minimum(i_last, _floor_div(col_b, chunk) * chunk + chunk - 1 - shift)
    return i_first, i_last


@triton.jit
def _tile_ranges(first, last, full_first, full_last, n, BLOCK: tl.constexpr):
    """Tile bounds of the visible index range [first, last] of a dimension of length n: loop over
    [begin, end); tiles in [f0, f1) are inside the fully visible range [full_first, full_last]."""
    begin = (tl.maximum(first, 0) // BLOCK) * BLOCK
    end = tl.minimum(last + 1, n)
    f0 = ((tl.maximum(full_first, 0) + BLOCK - 1) // BLOCK) * BLOCK
    f1 = tl.minimum((tl.minimum(full_last + 1, n) // BLOCK) * BLOCK, end)
    f0 = tl.maximum(f0, begin)
    empty = f1 <= f0
    f0 = tl.where(empty, begin, f0)
    f1 = tl.where(empty, begin, f1)
    return begin, f0, f1, end


@triton.jit
def _seq_info(CuSeq, off_b, seqlen, VARLEN: tl.constexpr):
    """(start offset in the packed dim, length) of sequence off_b."""
    if VARLEN:
        start = tl.load(CuSeq + off_b)
        n = tl.load(CuSeq + off_b + 1) - start
    else:
        start = off_b * 0
        n = seqlen + off_b * 0
    return start, n


# -- per-sequence masks: key padding, seqused_k, segments (constexpr-gated) -------------------------
def mask_args(dummy, key_mask=None, key_bounds=None, seqused_k=None, segment_bounds=None):
    """Kernel arguments of the per-sequence masks: ((KeyMask, KBounds, SeqUsedK, SegBounds),
    (stride_mb, stride_sb), constexprs KPAD/SEQUSED/SEGMENTS). key_mask int8 (B, Nk) view of the bool
    mask (unit last stride, any batch stride, 0 for a broadcast one); key_bounds int32 (B, 2) first/last
    valid key; seqused_k int32 (B,); segment_bounds int32 (B, 2, N) contiguous run start/end per token.
    Absent ones pass ``dummy`` (never read)."""
    ptrs = tuple(dummy if t is None else t for t in (key_mask, key_bounds, seqused_k, segment_bounds))
    strides = (0 if key_mask is None else key_mask.stride(0), 0 if segment_bounds is None else segment_bounds.stride(0))
    cx = dict(KPAD=key_mask is not None, SEQUSED=seqused_k is not None, SEGMENTS=segment_bounds is not None)
    return ptrs, strides, cx


@triton.jit
def _used_keys(SeqUsedK, off_b, n_k, SEQUSED: tl.constexpr):
    """Keys of sequence off_b: min(seqused_k[b], n_k) with SEQUSED, else n_k."""
    if SEQUSED:
        n_k = tl.minimum(tl.load(SeqUsedK + off_b), n_k)
    return n_k


@triton.jit
def _seg_clip(SegS, idx, n, lo, hi, seg_n, SEGMENTS: tl.constexpr):
    """[lo, hi] intersected with the run [start, end] holding index ``idx`` (scalar or vector;
    SegS: the sequence's run starts, its run ends ``seg_n`` further). Run bounds are non-decreasing
    along the row, so intersected row bounds stay monotone (the tile-range scheme holds)."""
    if SEGMENTS:
        ok = idx < n
        lo = tl.maximum(lo, tl.load(SegS + idx, mask=ok, other=0))
        hi = tl.minimum(hi, tl.load(SegS + seg_n + idx, mask=ok, other=-1))
    return lo, hi


@triton.jit
def _key_clip(KBounds, off_b, lo, hi, KPAD: tl.constexpr):
    """[lo, hi] intersected with [first, last] valid key of sequence off_b (from key_padding_mask)."""
    if KPAD:
        lo = tl.maximum(lo, tl.load(KBounds + off_b * 2))
        hi = tl.minimum(hi, tl.load(KBounds + off_b * 2 + 1))
    return lo, hi


@triton.jit
def _key_ok(KM_base, cols, n_k):
    """Bool (len(cols),): key_padding_mask of the keys ``cols`` (False past n_k)."""
    return tl.load(KM_base + cols, mask=cols < n_k, other=0) != 0


@triton.jit
def _offs_dv(offs_d, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Column offsets of the v head dim: ``offs_d`` itself when the blocks match (so kernels with
    Dv == D build the same IR as before Dv existed), else arange(0, BLOCK_DV)."""
    if BLOCK_DV == BLOCK_D:
        offs = offs_d
    else:
        offs = tl.arange(0, BLOCK_DV)
    return offs


@triton.jit
def _load_rows(Base, rows, stride_n, offs_d, n_rows, CHECK_ROWS: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= n_rows (when CHECK_ROWS) and d >= HEAD_DIM read 0."""
    ptrs = Base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            t = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            t = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return t


@triton.jit
def _store_rows(Base, rows, stride_n, offs_d, n_rows, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = Base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, value.to(Base.dtype.element_ty), mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, value.to(Base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


# -- score modifiers (softcap, ALiBi), shared with the backward and the decode kernel ------------
@triton.jit
def _scores(qk, pos_a, pos_b, qk_scale, softcap, slope, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Scores in log2 units from the raw dot product ``qk``, and tanh(scale * qk / cap) (the
    softcap gradient factor is 1 - t^2; t is ``qk`` unchanged without SOFTCAP).

    Plain: qk_scale = scale * log2(e). SOFTCAP: qk_scale = scale / cap, softcap = cap * log2(e),
    s = cap * tanh(scale * qk / cap). ALIBI: s -= slope * |pos_a - pos_b| with slope in log2 units
    (pos_a/pos_b broadcast to the tile: aligned query positions and key indices, either order).
    Constexpr-gated: without SOFTCAP/ALIBI this is the single multiply of the plain kernel.
    """
    if SOFTCAP:
        x = qk * qk_scale
        e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|) in (0, 1]: no overflow
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        s = t * softcap
    else:
        s = qk * qk_scale
        t = qk
    if ALIBI:
        s = s - slope * tl.abs(pos_a - pos_b).to(tl.float32)
    return s, t


@triton.jit
def _dropout_keep(seed, offset, dropout_p):
    """Keep decision of the (batch, head, row, col) elements at Philox counters ``offset``:
    U(0, 1) from ``tl.rand(seed, offset)`` >= dropout_p. offset = ((b * Hq + h) * NQ + row) * NK + col
    (int64; varlen: b = 0 and row/col the packed positions, NQ/NK the packed totals), the same in
    the forward, both backward kernels, the mask kernel and the CPU replica
    (``fasttfm.ops.attention.philox_keep``)."""
    return tl.rand(seed, offset) >= dropout_p


@triton.jit
def _drop_rows(off_b, off_h, num_heads, rows, q_start, k_start, drop_nq, drop_nk, VARLEN: tl.constexpr):
    """Per-row Philox counter base ((b * Hq + h) * NQ + q_start + row) * NK + k_start (int64)."""
    if VARLEN:
        bh = off_h.to(tl.int64)
    else:
        bh = off_b.to(tl.int64) * num_heads + off_h
    return (bh * drop_nq + q_start + rows) * drop_nk + k_start


@triton.jit
def _alibi_slope(Alibi, off_b, off_h, stride_ab, ALIBI: tl.constexpr):
    """The head's ALiBi slope in log2 units (fp32 slopes (H,) or (B, H); 0 without ALIBI)."""
    if ALIBI:
        slope = tl.load(Alibi + off_b.to(tl.int64) * stride_ab + off_h) * 1.4426950408889634
    else:
        slope = 0.0
    return slope


def score_args(qk_scale, softcap, alibi_slopes, dummy):
    """(kernel qk_scale, kernel softcap, Alibi pointer, stride_ab, SOFTCAP, ALIBI) from the plain
    ``qk_scale = scale * log2(e)``, a softcap (0 = off) and optional fp32 slopes (H,) or (B, H)."""
    if softcap:
        kscale, kcap = qk_scale / LOG2E / softcap, softcap * LOG2E
    else:
        kscale, kcap = qk_scale, 0.0
    if alibi_slopes is None:
        return kscale, kcap, dummy, 0, bool(softcap), False
    stride_ab = alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0
    return kscale, kcap, alibi_slopes, stride_ab, bool(softcap), True


def dropout_args(q, k, varlen, dropout_p, seed):
    """(seed, dropout_p, NQ, NK) kernel arguments: NQ/NK the (packed) q and k lengths."""
    return (int(seed), float(dropout_p), q.shape[2], k.shape[2])


@triton.jit
def _dropout_mask(Mask, seed, dropout_p, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug: the keep mask (B, Hq, Nq, Nk) int8 of a dense problem, from the kernels' own helpers."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    drop_rows = _drop_rows(off_b, off_h, tl.num_programs(1), rows, 0, 0, seqlen_q, seqlen_k, False)
    base = Mask + (off_b.to(tl.int64) * tl.num_programs(1) + off_h) * seqlen_q * seqlen_k
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, drop_rows[:, None] + cols[None, :], dropout_p)
        tl.store(base + rows.to(tl.int64)[:, None] * seqlen_k + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))


def dropout_mask(batch, hq, seqlen_q, seqlen_k, *, dropout_p, seed, device, interpret=False):
    """Bool (B, Hq, Nq, Nk) keep mask the dense kernels use for (seed, dropout_p) -- debugging/tests."""
    mask = torch.empty(batch, hq, seqlen_q, seqlen_k, dtype=torch.int8, device=device)
    grid = (triton.cdiv(seqlen_q, 32), hq, batch)
    _launch(_dropout_mask, grid, (mask, int(seed), float(dropout_p), seqlen_q, seqlen_k),
            dict(BLOCK_M=32, BLOCK_N=64), AttnConfig(32, 64, 4, 1), interpret)
    return mask.bool()

"""Flash attention forward in Triton: mask helpers, ``_attn_fwd``, the backward preprocess,
launchers, per-architecture configs, the config heuristic and the forward's static-report cases
(``aot_cases_fwd``; ``attention_aot.aot_cases`` collects forward, backward and decode).

Tensors reach the kernels as *canonical views* (no copies): q/k/v/o are 4-D (B, H, N, D) views
whose last dim has stride 1 -- SDPA's (B, H, N, D) as is, flash-attn's (B, N, H, D) permuted,
and varlen's packed (total, H, D) as (1, H, total, D) plus ``cu_seqlens``. v/o/dO/dV may have their
own head dim Dv (HEAD_DIM_V/BLOCK_DV; MLA-style 192/128), q/k/dQ/dK have D. LSE/Delta are fp32
(B, H, Nq) (varlen: (H, total_q)) in natural-log units.

Masking (FlashAttention's conventions; one place, ``_row_bounds``/``_col_bounds``): with
shift s = Nk - Nq (per sequence), query i has aligned position p = i + s and sees key j iff
    p - left <= j <= p + right          (window; causal is right = 0; unbounded = 2**30)
    floor(p / C) == floor(j / C)        (chunk_size C, only when CHUNKED)
    0 <= j < Nk.
Every row sees one contiguous interval [lo(i), hi(i)], and lo/hi grow with i. So a q-tile needs
only kv-tiles between lo(first row) and hi(last row) (``_tile_ranges``): fully masked tiles are
never loaded or computed, and work follows the visible area. Tiles inside [lo(last row),
hi(first row)] are visible for every row and skip the elementwise mask (a per-tile runtime
branch; one loop, not three: separate masked/unmasked loops cost ~50 registers and spilled in
the backward). The dK/dV kernel inverts the same bounds (``_col_bounds``) to get the q-tile
range of a kv-tile.

Numerics: scores in log2 units (``qk_scale = softmax_scale * log2(e)`` folded into one
multiply, ``exp2``); fp32 statistics and accumulators; P is rounded to the input dtype before
the P @ V product (fp16/bf16 tensor cores). fp32 inputs use IEEE fp32 dots (no TF32). Rows with
no visible key give output 0 and LSE -inf.

Per-sequence masks, constexpr-gated (KPAD, SEQUSED, SEGMENTS; dense problems, SEQUSED also varlen):
SEQUSED replaces n_k by seqused_k[b] (so the shift above is seqused_k[b] - Nq); SEGMENTS intersects
[lo(i), hi(i)] with the run [start(i), end(i)] of equal segment ids holding row i (both bounds stay
monotone in i, so the tile ranges above still hold); KPAD clips a q tile's kv range to the
sequence's first/last valid key (computed on the device by the op layer) and masks each loaded tile
with the key_padding_mask row. The op layer computes run bounds and key bounds with torch ops (no
host sync). Masked problems launch one checked config per kernel (``fwd_configs(masks=True)``).

Score modifiers, constexpr-gated (SOFTCAP, ALIBI, DROPOUT all False compile the plain kernel):
softcap s = cap * tanh(s / cap) and ALiBi bias -slope_h * |i + shift - j| (``_scores``, after the
cap), dropout of P by Philox keyed on (batch, head, row, col) (``_dropout_keep``; the LSE stays that
of the full softmax, the output is sum(P o Z) V / (1 - p) / l). Modified problems use smaller
tiles (``_MOD_FWD`` here, ``_MOD_DKDV``/``_MOD_DQ`` in the backward). Helpers live in
``kernels/attention_common.py``; KV-cache decoding in ``kernels/attention_decode.py``.
"""
import os

import torch
import triton
import triton.language as tl

from ._aot import AotCase
# Shared helpers live in attention_common; the names other code reads from this module
# (AttnConfig, LOG2E, UNBOUNDED, canonical_strides, _arch, block_d, _AUTOTUNED, ...) stay importable here.
from .attention_common import (BEFORE_38, LOG2E, TRITON_37, UNBOUNDED, AttnConfig, _alibi_slope,  # noqa: F401
                               _arch, _autotuned, _AUTOTUNED, _bucket, _bucket_dim, _cc, _col_bounds, _DT,
                               _drop_rows, _dropout_keep, _dropout_mask, _floor_div, _input_precision, _key_clip,
                               _key_ok, _launch, _load_rows, _offs_dv, _row_bounds, _scores, _seg_clip, _seq_info,
                               _store_rows, _tile_ranges, _used_keys, aot_attrs, aot_case_parts, aot_signature,
                               autotune_enabled,
                               block_d, canonical_strides, dropout_args, dropout_mask, lse_strides, mask_args,
                               replace_configs, score_args)

__all__ = ["AttnConfig", "attn_fwd", "attn_bwd_preprocess", "fwd_configs", "pick_fwd_config",
           "canonical_strides", "UNBOUNDED", "aot_cases_fwd", "SMOKE_FWD"]

# -- configs ---------------------------------------------------------------------------------
# Not folded with the backward's tables (issue 13 item 8): same shape, different data -- each kernel's
# list is ordered by its own static report and H200 timings; the lookup code is shared (_bucket).
# (max head-dim block, [configs]) per compute capability major; every entry must pass the
# static report (no spills unless MEASURED_SPILLS in attention_bwd.py grants a GPU-measured
# allowance, smem within the per-block limit, HGMMA on sm_90), see aot_cases.
# sm_90 order: timed on an H200 (triton 3.6, bf16, N=4096; full / causal ms; bench/tune_attention.py,
# bench/results/gpu/tune_bf16_n4096.json). Registers with TMA loads (pointer loads in parentheses).
_FWD_CONFIGS = {
    9: [(64, [AttnConfig(64, 128, 4, 2),     # 1.26 / 0.72 ms; 159 regs, 72 KB
              AttnConfig(128, 128, 8, 3),    # 1.66 / 0.95 ms (the old default); 159 regs, 112 KB (174)
              AttnConfig(128, 64, 8, 3),     # 107 regs, 64 KB
              AttnConfig(64, 64, 4, 3)]),    # 1.32 / 0.74 ms; 106 regs, 56 KB
        (128, [AttnConfig(64, 64, 4, 3),     # 1.10 / 0.61 ms; 139 regs, 112 KB
               AttnConfig(128, 64, 8, 3),    # 1.22 / 0.70 ms (the old default); 153 regs, 128 KB (164)
               AttnConfig(128, 128, 8, 2)]), # 188 regs, 160 KB (238)
        (256, [AttnConfig(128, 64, 8, 2),    # 224 regs, 192 KB (255)
               AttnConfig(128, 32, 8, 2)])], # 209 regs, 128 KB
    8: [(64, [AttnConfig(128, 128, 8, 2),    # 218 regs, 80 KB
              AttnConfig(128, 64, 8, 3),     # 162 regs, 64 KB
              AttnConfig(64, 64, 4, 3)]),    # 158 regs, 48 KB
        (128, [AttnConfig(128, 64, 8, 2),    # 214 regs, 80 KB
               AttnConfig(128, 64, 8, 3),    # 215 regs, 112 KB
               AttnConfig(128, 32, 8, 2)]),  # 171 regs, 56 KB
        (256, [AttnConfig(128, 64, 8, 2),    # 255 regs, 144 KB
               AttnConfig(64, 64, 4, 2)])],  # 255 regs, 104 KB
}
# sm_86 / sm_89 / sm_12x ("86" class): sm_80's code generation, 99 KiB of shared memory per block:
# sm_80's d64 list; d128 without the 3-stage 112 KB config; d256 64x32 w4 s2 (255 regs, 68 KB)
_FWD_CONFIGS[86] = [_FWD_CONFIGS[8][0],
                    (128, [c for c in _FWD_CONFIGS[8][1][1] if c != AttnConfig(128, 64, 8, 3)]),
                    (256, [AttnConfig(64, 32, 4, 2)])]
# With score modifiers (softcap / ALiBi / dropout: tanh, bias and Philox add ~30-90 registers) the
# big tiles spill (e.g. dK/dV d64 64x128 sm_90: 88 B with all three): one smaller config per bucket.
_MOD_FWD = {9: {64: AttnConfig(64, 64, 4, 3), 128: AttnConfig(64, 64, 4, 3), 256: AttnConfig(64, 32, 4, 2)},
            8: {64: AttnConfig(64, 64, 4, 3), 128: AttnConfig(128, 32, 8, 2), 256: AttnConfig(64, 32, 4, 2)}}
_MOD_FWD[86] = {**_MOD_FWD[8], 256: AttnConfig(64, 32, 8, 2)}  # sm_80 64x32 w4 spilled 56 B for sm_86
if BEFORE_38:  # Triton 3.6 and 3.7 (static report, fp16 and bf16): these spill there, 3.8 spills none
    _FWD_CONFIGS = replace_configs(_FWD_CONFIGS, {
        8: {256: {AttnConfig(64, 64, 4, 2): AttnConfig(64, 64, 8, 2)}},    # 8 B -> 0 (175 regs, 104 KB)
        86: {256: {AttnConfig(64, 32, 4, 2): AttnConfig(64, 32, 8, 2)}}})  # 8 B -> 0 (161 regs)
    _MOD_FWD = replace_configs(_MOD_FWD, {
        8: {256: {AttnConfig(64, 32, 4, 2): AttnConfig(64, 32, 8, 2)}}})   # 64-72 B -> 0 (sm_86's choice)
if TRITON_37:  # sm_80 d256 128x64 w8 s2: 8 B on 3.7 (0 on 3.6 and 3.8) -> 128x32 (255 regs, 0)
    _FWD_CONFIGS = replace_configs(_FWD_CONFIGS, {8: {256: {AttnConfig(128, 64, 8, 2): AttnConfig(128, 32, 8, 2)}}})
# Per-sequence masks (key padding / seqused_k / segments; +10-30 registers): one config per bucket,
# the plain (or, with softcap/ALiBi/dropout, the _MOD_FWD) default, swapped where that one spills
# with all three masks on (static report, Triton 3.8; ``attention_aot._masked`` compiles them):
# {(arch, mods): {bucket: {default: replacement}}}
_MASKED_FWD = {(8, False): {256: {AttnConfig(128, 64, 8, 2): AttnConfig(64, 64, 8, 2)}},   # 32 B -> 0 (192 regs)
               (86, False): {256: {AttnConfig(64, 32, 4, 2): AttnConfig(64, 32, 8, 2)}},  # 16 B -> 0 (168 regs)
               (9, True): {256: {AttnConfig(64, 32, 4, 2): AttnConfig(64, 32, 8, 2)}},    # 16 B -> 0 (173 regs)
               (8, True): {256: {AttnConfig(64, 32, 4, 2): AttnConfig(64, 32, 8, 2)}}}    # 80 B -> 0 (244 regs)
SMOKE_FWD = AttnConfig(32, 32, 4, 1)  # cheap config for interpreter tests


def fwd_configs(cc, head_dim, dtype=torch.float16, mods=False, masks=False):
    """The forward tuning list for compute capability ``cc`` (80, 86, 89, 90...) and head dim;
    ``mods``: softcap, ALiBi or dropout active (smaller tiles, see _MOD_FWD); ``masks``: key padding,
    seqused_k or segments active (one config, see _MASKED_FWD)."""
    if masks:
        cfg = fwd_configs(cc, head_dim, dtype, mods)[0]
        return [_MASKED_FWD.get((_arch(cc), bool(mods)), {}).get(_bucket_dim(head_dim), {}).get(cfg, cfg)]
    elt = torch.empty((), dtype=dtype).element_size()
    if elt == 4:  # fp32 (IEEE dots on CUDA cores): small tiles (64x32 spills 80 B on sm_80)
        return ([AttnConfig(64, 32, 4, 2)] if _arch(cc) == 9 and not mods else []) + [AttnConfig(32, 32, 4, 2)]
    if mods:
        return [_MOD_FWD[_arch(cc)][_bucket_dim(head_dim)]]
    return list(_bucket(_FWD_CONFIGS[_arch(cc)], head_dim))


def pick_fwd_config(cc, head_dim, dtype, seqlen_q, mods=False, masks=False):
    """Heuristic (autotuning off): first listed config, or the smallest BLOCK_M one for short q."""
    cfgs = fwd_configs(cc, head_dim, dtype, mods, masks)
    if seqlen_q <= 64:
        return min(cfgs, key=lambda c: (c.BLOCK_M, -c.BLOCK_N))
    return cfgs[0]


# -- forward ---------------------------------------------------------------------------------
# Kept apart from _attn_bwd_dq_inner (issue 13 item 8): the score/mask prologue is shared through helpers
# (_load_rows, _scores, _key_ok, _dropout_keep); the rest differs (online softmax and P @ V here, exp
# against the stored LSE and dS @ K there), and folding the mask step would move dQ's mask from P to S,
# changing the compiled code the H200 timings measured.
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, offs_n, offs_d,
                    offs_dv, n_k, lo_row, hi_row, start, end, f0, f1, qk_scale, pos_q, softcap, slope,
                    drop_rows, seed, dropout_p, KM_base,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, TMA: tl.constexpr,
                    KPAD: tl.constexpr):
    """K_base / V_base: row pointers, or with TMA tensor descriptors of the sequence's (n_k, HEAD_DIM)
    keys and (n_k, HEAD_DIM_V) values; offs_d / offs_dv index the q/k and the v head dims.
    KPAD: every tile also hides the keys whose key_padding_mask (at KM_base) is False."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if TMA:
            k = K_base.load([start_n, 0])
        else:
            k = _load_rows(K_base, cols, stride_kn, offs_d, n_k, True, HEAD_DIM, BLOCK_D)
        # -- scores in log2 units
        s, _t = _scores(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), pos_q[:, None], cols[None, :],
                        qk_scale, softcap, slope, SOFTCAP, ALIBI)
        if (start_n < f0) | (start_n >= f1):  # kv tile partly masked for this q tile
            visible = (cols[None, :] >= lo_row[:, None]) & (cols[None, :] <= hi_row[:, None])
            s = tl.where(visible, s, float("-inf"))
        if KPAD:
            s = tl.where(_key_ok(KM_base, cols, n_k)[None, :], s, float("-inf"))
        # -- update m_i and l_i
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- update the output accumulator
        if TMA:
            v = V_base.load([start_n, 0])
        else:
            v = _load_rows(V_base, cols, stride_vn, offs_dv, n_k, True, HEAD_DIM_V, BLOCK_DV)
        acc = acc * alpha[:, None]
        if DROPOUT:  # l_i keeps the full softmax sum; dropped P entries do not reach the output
            p = tl.where(_dropout_keep(seed, drop_rows[:, None] + cols[None, :], dropout_p), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, CuSeqQ, CuSeqK, Alibi, KeyMask, KBounds, SeqUsedK, SegBounds,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
              stride_lb, stride_lh, stride_ab, stride_mb, stride_sb,
              seqlen_q, seqlen_k, group, qk_scale, softcap, win_left, win_right, chunk,
              seed, dropout_p, drop_nq, drop_nk,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr, VARLEN: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              DROPOUT: tl.constexpr, TMA: tl.constexpr = False, KPAD: tl.constexpr = False,
              SEQUSED: tl.constexpr = False, SEGMENTS: tl.constexpr = False):
    """One (BLOCK_M query tile, q head, sequence) per program; grid (cdiv(max Nq, BLOCK_M), Hq, B).

    Head dims: Q/K have HEAD_DIM (padded to BLOCK_D), V/O have HEAD_DIM_V (padded to BLOCK_DV; equal
    to HEAD_DIM except for MLA-style problems, e.g. DeepSeek-V3's 192/128). Heaviest tiles (last rows,
    causal) are scheduled first. TMA (sm_90): K and V tiles come through tensor descriptors of the
    sequence's (n_k, HEAD_DIM) and (n_k, HEAD_DIM_V) rows, so the hardware zero-fills rows past n_k and
    columns past the head dim (what the masked pointer loads do otherwise); the launcher checks the
    16-byte alignment of base and row stride that TMA needs.

    Per-sequence masks (dense only): SEQUSED: n_k = seqused_k[b] (alignment shift n_k - n_q);
    SEGMENTS: row i's bounds intersected with its run [start, end] (SegBounds (B, 2, N)); KPAD: the
    kv range clipped to the sequence's first/last valid key (KBounds (B, 2)) and each tile masked by
    the key_padding_mask row (KeyMask int8 (B, Nk)).
    """
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // group
    q_start, n_q = _seq_info(CuSeqQ, off_b, seqlen_q, VARLEN)
    k_start, n_k = _seq_info(CuSeqK, off_b, seqlen_k, VARLEN)
    n_k = _used_keys(SeqUsedK, off_b, n_k, SEQUSED)
    shift = n_k - n_q
    SegS = SegBounds + off_b.to(tl.int64) * stride_sb

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = _offs_dv(offs_d, BLOCK_D, BLOCK_DV)
    b64 = off_b.to(tl.int64)
    Q_base = Q + b64 * stride_qb + off_h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qn
    K_base = K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    V_base = V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn

    # -- visible kv range of this q tile (first/last row), and its fully visible part
    m_first = start_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, n_q) - 1
    lo_first, hi_first = _row_bounds(m_first, shift, win_left, win_right, chunk, CHUNKED)
    lo_last, hi_last = _row_bounds(m_last, shift, win_left, win_right, chunk, CHUNKED)
    lo_first, hi_first = _seg_clip(SegS, m_first, n_q, lo_first, hi_first, seqlen_q, SEGMENTS)
    lo_last, hi_last = _seg_clip(SegS, m_last, n_q, lo_last, hi_last, seqlen_q, SEGMENTS)
    hi_last = tl.where(m_first < n_q, hi_last, -1)  # tile past the end of this sequence: no work
    lo_first, hi_last = _key_clip(KBounds, off_b, lo_first, hi_last, KPAD)  # skip fully padded tiles
    begin, f0, f1, end = _tile_ranges(lo_first, hi_last, lo_last, hi_first, n_k, BLOCK_N)
    lo_row, hi_row = _row_bounds(offs_m, shift, win_left, win_right, chunk, CHUNKED)
    lo_row, hi_row = _seg_clip(SegS, offs_m, n_q, lo_row, hi_row, seqlen_q, SEGMENTS)
    hi_row = tl.minimum(hi_row, n_k - 1)

    if TMA:  # (no key: n_k = 0 never loads, the descriptor just stays valid with one row)
        K_ld = tl.make_tensor_descriptor(K_base, shape=[tl.maximum(n_k, 1), HEAD_DIM], strides=[stride_kn, 1],
                                         block_shape=[BLOCK_N, BLOCK_D])
        V_ld = tl.make_tensor_descriptor(V_base, shape=[tl.maximum(n_k, 1), HEAD_DIM_V], strides=[stride_vn, 1],
                                         block_shape=[BLOCK_N, BLOCK_DV])
    else:
        K_ld = K_base
        V_ld = V_base

    q = _load_rows(Q_base, offs_m, stride_qn, offs_d, n_q, True, HEAD_DIM, BLOCK_D)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: no inf - inf on empty rows
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    slope = _alibi_slope(Alibi, off_b, off_h, stride_ab, ALIBI)
    drop_rows = _drop_rows(off_b, off_h, tl.num_programs(1), offs_m, q_start, k_start, drop_nq, drop_nk, VARLEN)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_ld, V_ld, stride_kn, stride_vn, offs_n,
                                    offs_d, offs_dv, n_k, lo_row, hi_row, begin, end, f0, f1, qk_scale,
                                    offs_m + shift, softcap, slope, drop_rows, seed, dropout_p,
                                    KeyMask + off_b.to(tl.int64) * stride_mb,
                                    HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, INPUT_PRECISION, SOFTCAP,
                                    ALIBI, DROPOUT, TMA, KPAD)

    # -- epilogue: rows with no visible key -> output 0, LSE -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        l_safe = l_safe * (1.0 - dropout_p)  # kept entries scaled by 1 / (1 - p)
    out = acc / l_safe[:, None]
    if DROPOUT:
        l_safe = l_safe / (1.0 - dropout_p)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    O_base = Out + b64 * stride_ob + off_h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_on
    _store_rows(O_base, offs_m, stride_on, offs_dv, n_q, out, HEAD_DIM_V, BLOCK_DV)
    L_base = Lse + b64 * stride_lb + off_h.to(tl.int64) * stride_lh + q_start.to(tl.int64)
    tl.store(L_base + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def _attn_bwd_preprocess(Out, DO, Delta, CuSeqQ,
                         stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
                         stride_lb, stride_lh, seqlen_q,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         VARLEN: tl.constexpr):
    """Delta = rowsum(dO * O) in fp32, laid out like LSE; grid (cdiv(max Nq, BLOCK_M), Hq, B).
    O and dO have the v head dim: the launcher passes it as HEAD_DIM."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2)
    q_start, n_q = _seq_info(CuSeqQ, off_b, seqlen_q, VARLEN)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = off_b.to(tl.int64)
    qs = q_start.to(tl.int64)
    o = _load_rows(Out + b64 * stride_ob + off_h * stride_oh + qs * stride_on, offs_m, stride_on,
                   offs_d, n_q, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + b64 * stride_db + off_h * stride_dh + qs * stride_dn, offs_m, stride_dn,
                    offs_d, n_q, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + off_h * stride_lh + qs + offs_m, delta, mask=offs_m < n_q)


# -- launchers ---------------------------------------------------------------------------------
def tma_enabled():
    return os.environ.get("FASTTFM_TMA", "1").strip().lower() not in ("0", "false", "no", "off")


def use_tma(cc, k, v, varlen):
    """Whether the forward loads K/V through TMA tensor descriptors: the sm_90 table (Hopper and
    later), fp16/bf16, FASTTFM_TMA not 0, and the 16-byte alignment TMA requires of the base
    pointers and of every stride in bytes (dims of size 1 excepted)."""
    if _arch(cc) != 9 or k.dtype not in (torch.float16, torch.bfloat16) or not tma_enabled():
        return False
    for t in (k, v):
        sizes = (1 if varlen else t.shape[0], t.shape[1], t.shape[2])
        if t.data_ptr() % 16 or any(n > 1 and (st * t.element_size()) % 16
                                    for n, st in zip(sizes, canonical_strides(t, varlen))):
            return False
    return True


def _tma_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator():
    """Device-side tensor descriptors need a little global scratch per program at launch. Triton keeps
    its allocator in a ContextVar, so a thread that never set one (autograd's backward thread
    recomputing a checkpointed forward, say) sees none: check before every TMA launch. Private
    Triton names are looked up defensively (``_NULL_ALLOCATOR`` is absent before Triton 3.6): when
    the current allocator cannot be read, ours is set (it only allocates scratch with torch)."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator.get()
    except (ImportError, AttributeError):
        current = None
    null = getattr(_allocation, "_NULL_ALLOCATOR", None) if current is not None else None
    if current is None or current is null or type(current).__name__ == "NullAllocator":
        triton.set_allocator(_tma_scratch)


def attn_fwd(q, k, v, out, lse, *, batch, seqlen_q, seqlen_k, max_seqlen_q, cu_seqlens_q=None,
             cu_seqlens_k=None, qk_scale, win_left, win_right, chunk_size=None, softcap=0.0,
             alibi_slopes=None, dropout_p=0.0, seed=0, config=None, interpret=False, tma=None, key_mask=None,
             key_bounds=None, seqused_k=None, segment_bounds=None):
    """Launch ``_attn_fwd`` on canonical 4-D views q (.., Hq, N, D), k (.., Hkv, N, D), v (.., Hkv, N, Dv),
    out (.., Hq, N, Dv) (Dv may differ from D; configs are chosen by max(D, Dv)).

    win_left/win_right: window sizes with UNBOUNDED for -1 (causal already folded into right=0).
    qk_scale = softmax_scale * log2(e). config: AttnConfig (None: heuristic or autotune on GPU).
    softcap > 0: scores cap * tanh(score / cap); alibi_slopes: fp32 (Hq,) or (B, Hq), contiguous
    last dim, bias -slope * |i + Nk - Nq - j| added after the cap (FlashAttention's order).
    dropout_p > 0: attention probabilities dropped by Philox(seed) (see ``_dropout_keep``).
    tma: K/V through tensor descriptors (None: ``use_tma`` decides; the interpreter runs them too).
    key_mask / key_bounds / seqused_k / segment_bounds (dense only): see ``attention_common.mask_args``.
    """
    varlen = cu_seqlens_q is not None
    hq, hkv, d, dv = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    tma = use_tma(_cc(q), k, v, varlen) if tma is None else tma
    if tma and not interpret:
        ensure_tma_allocator()
    bd = block_d(d)
    cu_q = cu_seqlens_q if varlen else q  # dummy pointer when dense (never read)
    cu_k = cu_seqlens_k if varlen else q
    kscale, kcap, alibi, stride_ab, has_cap, has_alibi = score_args(qk_scale, softcap, alibi_slopes, lse)
    mptrs, mstrides, mcx = mask_args(lse, key_mask, key_bounds, seqused_k, segment_bounds)
    args = (q, k, v, out, lse, cu_q, cu_k, alibi, *mptrs, *canonical_strides(q, varlen),
            *canonical_strides(k, varlen), *canonical_strides(v, varlen), *canonical_strides(out, varlen),
            *lse_strides(lse, varlen), stride_ab, *mstrides,
            seqlen_q, seqlen_k, hq // hkv, kscale, kcap, win_left, win_right, chunk_size or 1,
            *dropout_args(q, k, varlen, dropout_p, seed))
    constexprs = dict(HEAD_DIM=d, BLOCK_D=bd, HEAD_DIM_V=dv, BLOCK_DV=block_d(dv), CHUNKED=chunk_size is not None,
                      VARLEN=varlen,
                      INPUT_PRECISION=_input_precision(q.dtype), SOFTCAP=has_cap, ALIBI=has_alibi,
                      DROPOUT=dropout_p > 0, TMA=bool(tma), **mcx)
    mods = bool(softcap) or alibi_slopes is not None or dropout_p > 0
    masks = any(mcx.values())
    if config is None and autotune_enabled():
        kernel = _autotuned(_attn_fwd, fwd_configs(_cc(q), max(d, dv), q.dtype, mods, masks), interpret)
        grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), hq, batch)  # noqa: E731
        return _launch(kernel, grid, args, constexprs, None, interpret, autotune_configs=True)
    if config is None:
        config = SMOKE_FWD if interpret else pick_fwd_config(_cc(q), max(d, dv), q.dtype, max_seqlen_q, mods, masks)
    grid = (triton.cdiv(max_seqlen_q, config.BLOCK_M), hq, batch)
    constexprs.update(BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N)
    _launch(_attn_fwd, grid, args, constexprs, config, interpret)


def attn_bwd_preprocess(out, do, delta, *, batch, seqlen_q, max_seqlen_q, cu_seqlens_q=None,
                        interpret=False):
    """Launch ``_attn_bwd_preprocess``: Delta (like LSE) = rowsum(dO * O) over the v head dim Dv of
    out/do (.., Hq, N, Dv)."""
    varlen = cu_seqlens_q is not None
    d = out.shape[-1]
    block_m = 64 if block_d(d) <= 128 else 32
    grid = (triton.cdiv(max_seqlen_q, block_m), out.shape[1], batch)
    args = (out, do, delta, cu_seqlens_q if varlen else out, *canonical_strides(out, varlen),
            *canonical_strides(do, varlen), *lse_strides(delta, varlen), seqlen_q)
    constexprs = dict(HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=block_m, VARLEN=varlen)
    _launch(_attn_bwd_preprocess, grid, args, constexprs, AttnConfig(block_m, 0, 4, 1), interpret)


# -- static report (collected by kernels/attention_aot.py) ---------------------------------------
def _fwd_case(cc, d, dt, cfg, tma, dv=None, **flags):
    """AotCase of ``_attn_fwd`` for one config; ``dv``: v head dim (None: d; named "d{d}v{dv}" when it
    differs); ``flags``: constexpr overrides (CHUNKED, SOFTCAP, ...)."""
    cx, sig, body = aot_case_parts(_attn_fwd, d, dv, dt, cfg, flags, TMA=tma)
    return AotCase(f"attn_fwd[{body}{',tma' if tma else ''}]", _attn_fwd, sig, cx, cfg.num_warps, cfg.num_stages,
                   tensor_core=dt != "fp32", attrs=aot_attrs(_attn_fwd, sig), tma=tma)


def aot_cases_fwd(cc):
    """Every plain forward config this module may launch on ``cc`` (80, 86 or 90), fp16 and bf16 at
    the head dims that fill each bucket (64, 128, 256), the fp32 configs at d64, and the Delta
    preprocess. Modified/masked variants are listed by ``attention_aot.aot_cases``."""
    cases = []
    tma = _arch(cc) == 9  # fp16/bf16 forwards load K/V through TMA there (aligned inputs, see use_tma)
    for d in (64, 128, 256):
        for dtype in (torch.float16, torch.bfloat16):
            # on sm_90 also the pointer-load fallback (misaligned inputs, FASTTFM_TMA=0)
            for cfg in fwd_configs(cc, d, dtype):
                cases += [_fwd_case(cc, d, _DT[dtype], cfg, t) for t in ((True, False) if tma else (False,))]
    cases += [_fwd_case(cc, 64, "fp32", cfg, False) for cfg in fwd_configs(cc, 64, torch.float32)]
    for d in (64, 128, 256):  # the memory-bound Delta preprocess (no tensor cores)
        sig = aot_signature(_attn_bwd_preprocess, "bf16")
        cx = dict(HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=64 if d <= 128 else 32, VARLEN=False)
        cases.append(AotCase(f"attn_bwd_preprocess[bf16,d{d}]", _attn_bwd_preprocess, sig, cx, 4, 1,
                             tensor_core=False, attrs=aot_attrs(_attn_bwd_preprocess, sig)))
    return cases

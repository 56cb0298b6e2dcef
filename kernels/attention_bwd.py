"""Flash attention backward in Triton: ``_attn_bwd_dkdv`` and ``_attn_bwd_dq`` (no atomics, so
bitwise deterministic), their launchers and configs. Mask helpers, canonical views and the
masking rules are those of ``kernels/attention.py``.

Math (S = scale * Q K^T masked, P = exp(S - LSE), Delta = rowsum(dO * O) from the preprocess):
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta),  dQ = scale * dS K,  dK = scale * dS^T Q.
Softcap (s = cap * tanh(x), x = scale q.k / cap) multiplies dS by 1 - tanh(x)^2 before the
dQ/dK products; the ALiBi bias is constant in q and k (recomputed for P only).
The dK/dV kernel owns one kv tile of one kv head and loops over the q heads of its GQA group and
the q tiles that can see the tile (the inverse of the forward's kv range), so GQA gradients are
summed in registers in a fixed order. The dQ kernel owns one q tile and loops over the same kv
range as the forward. Rows with LSE -inf (no visible key) and rows past the end use LSE +inf,
so their P and gradients are exactly 0.

Per-sequence masks (KPAD / SEQUSED / SEGMENTS, see ``_attn_fwd``): the dQ kernel masks like the
forward. The dK/dV kernel inverts the segment-clipped row bounds through the run bounds of its first
and last column; a kv tile outside the sequence's valid-key range (KPAD) or past seqused_k has no
work. A padded key or a key past seqused_k is invisible to every query, and row j of dK/dV depends on
row j of P^T only, so those rows are zeroed once at the end instead of masking P^T per q tile.
"""
from collections import namedtuple

import torch
import triton
import triton.language as tl

from ._aot import AotCase
from .attention_common import (LOG2E, TRITON_36, AttnConfig, _alibi_slope, _arch, _autotuned, _bucket,
                               _bucket_dim, _cc, _col_bounds, _drop_rows, _dropout_keep, _input_precision, _key_clip,
                               _key_ok, _launch, _load_rows, _offs_dv, _row_bounds, _scores, _seg_clip, _seq_info,
                               _store_rows, _tile_ranges, _used_keys, aot_attrs, aot_case_parts, aot_signature,
                               autotune_enabled,
                               block_d, canonical_strides, dropout_args, lse_strides, mask_args, replace_configs,
                               score_args)

__all__ = ["attn_bwd_dkdv", "attn_bwd_dq", "bwd_configs", "SMOKE_BWD", "aot_cases_bwd"]

BwdConfigs = namedtuple("BwdConfigs", "dkdv dq")
# AttnConfig for dK/dV: BLOCK_M = q rows per step, BLOCK_N = kv rows owned; for dQ: BLOCK_M = q
# rows owned, BLOCK_N = kv rows per step.
# sm_90 order: timed on an H200 (triton 3.6, bf16, N=4096, B*N=16k, H*D=2048; full / causal ms) by
# bench/tune_attention.py, results in bench/results/gpu/tune_bf16_n4096.json. Registers: triton 3.8 / 3.6.
_DKDV_CONFIGS = {
    9: [(64, [AttnConfig(32, 64, 4, 3),      # 2.61 / 1.40 ms; 190 / 251 regs, 41 KB
              AttnConfig(64, 64, 8, 3),      # 210 regs, 73 KB
              AttnConfig(64, 128, 8, 3)]),   # 3.27 / 1.76 ms (the old default); 254 regs (3.6: spills 136 B)
        (128, [AttnConfig(64, 64, 4, 2),     # 2.14 / 1.12 ms; SPILLS 344 / 392 B (MEASURED_SPILLS)
               AttnConfig(32, 64, 8, 2),     # 6.92 / 3.55 ms; 207 / 225 regs, 68 KB, no spills
               AttnConfig(16, 64, 4, 3)]),   # 249 regs, 56 KB
        (256, [AttnConfig(32, 64, 8, 1)])],  # 255 regs, 100 KB (the only spill-free HGMMA one found)
    8: [(64, [AttnConfig(32, 64, 4, 2),      # 255 regs, 24 KB
              AttnConfig(64, 32, 4, 2),      # 212 regs, 28 KB
              AttnConfig(32, 32, 4, 3)]),    # 156 regs, 26 KB
        (128, [AttnConfig(64, 64, 8, 2),     # 233 regs, 72 KB
               AttnConfig(32, 32, 4, 3)]),   # 227 regs, 50 KB
        (256, [AttnConfig(32, 64, 8, 1),     # 255 regs, 112 KB
               AttnConfig(16, 32, 4, 2)])],  # 255 regs, 49 KB
}
# 99 KiB per block (sm_86 class): sm_80's d64/d128 lists; at d256 only the 49 KB one fits (not 112 KB)
_DKDV_CONFIGS[86] = [*_DKDV_CONFIGS[8][:2], (256, [AttnConfig(16, 32, 4, 2)])]
_DQ_CONFIGS = {
    9: [(64, [AttnConfig(128, 64, 4, 3),     # 1.49 / 0.84 ms; 246 regs, 80 KB
              AttnConfig(128, 64, 8, 3),     # 1.99 / 1.09 ms (the old default); 133 regs, 80 KB
              AttnConfig(64, 64, 4, 3)]),    # 1.54 / 0.85 ms; 133 regs, 64 KB
        (128, [AttnConfig(128, 64, 8, 3),    # 1.51 / 0.84 ms (fastest measured); 174 regs, 160 KB
               AttnConfig(64, 64, 4, 3)]),   # 180 regs, 128 KB
        (256, [AttnConfig(64, 64, 4, 2),     # 255 regs, 192 KB
               AttnConfig(64, 32, 4, 2)])],  # 252 regs, 128 KB
    8: [(64, [AttnConfig(128, 64, 8, 2),     # 255 regs, 56 KB
              AttnConfig(64, 32, 4, 2)]),    # 200 regs, 28 KB
        (128, [AttnConfig(64, 64, 4, 2),     # 255 regs, 72 KB
               AttnConfig(64, 32, 4, 2)]),   # 200 regs, 52 KB
        (256, [AttnConfig(32, 32, 4, 2),     # 210 regs, 68 KB
               AttnConfig(16, 64, 4, 2)])],  # 197 regs, 82 KB
}
_DQ_CONFIGS[86] = _DQ_CONFIGS[8]  # all within 99 KiB
# Configs the static report lets spill up to this many bytes of stack, because a GPU measured them
# faster than every spill-free candidate: (arch class, kernel, config) -> bytes. dK/dV d128 64x64 w4 s2
# spills 344 B (triton 3.8) / 392 B (3.6) and ran 3.2x faster than the spill-free 32x64 w8 s2
# (2.14 vs 6.92 ms full, 1.12 vs 3.55 causal; H200, triton 3.6).
MEASURED_SPILLS = {(9, "dkdv", AttnConfig(64, 64, 4, 2)): 512}
SMOKE_BWD = BwdConfigs(AttnConfig(32, 32, 4, 1), AttnConfig(32, 32, 4, 1))
# softcap / ALiBi / dropout active: one smaller config per bucket (see kernels/attention.py _MOD_FWD)
_MOD_DKDV = {9: {64: AttnConfig(32, 64, 8, 3),      # 214 regs (softcap + ALiBi + dropout), 0 spills
                 128: AttnConfig(32, 64, 8, 2),     # 255 regs, 0 (16x64 w4 spilled 104 B)
                 256: AttnConfig(16, 32, 8, 1)},    # 171 regs, 0 (16x64 w8 spilled 56 B)
             8: {64: AttnConfig(32, 32, 4, 3),      # 213 regs
                 128: AttnConfig(32, 32, 4, 3),     # 243 regs
                 256: AttnConfig(16, 32, 8, 2)}}    # 206 regs (w4 spilled 72 B)
_MOD_DQ = {9: {64: AttnConfig(64, 64, 4, 3),        # 197 regs
               128: AttnConfig(64, 64, 8, 3),       # 255 regs, 0 (w4 spilled 120 B)
               256: AttnConfig(32, 32, 4, 2)},      # 243 regs
           8: {64: AttnConfig(64, 32, 4, 2),        # 251 regs
               128: AttnConfig(64, 32, 4, 2),       # 255 regs
               256: AttnConfig(16, 64, 4, 2)}}      # 247 regs
_MOD_DKDV[86], _MOD_DQ[86] = _MOD_DKDV[8], _MOD_DQ[8]
_FP32_DKDV = AttnConfig(32, 32, 4, 2)  # fp32 (IEEE dots on CUDA cores), both kernels, every arch
if TRITON_36:  # Triton 3.6 (static report, fp16 and bf16): these spill there, 3.7 and 3.8 spill none
    _DKDV_CONFIGS = replace_configs(_DKDV_CONFIGS, {
        9: {64: {AttnConfig(64, 128, 8, 3): AttnConfig(32, 128, 8, 3),    # 136 B -> 0 (248 regs): same kv tile
                 AttnConfig(64, 64, 8, 3): AttnConfig(64, 64, 8, 2)},     # 16 B -> 0 (248 regs)
            128: {AttnConfig(16, 64, 4, 3): AttnConfig(16, 64, 8, 3)}},   # 8 B -> 0 (227 regs)
        8: {64: {AttnConfig(32, 64, 4, 2): AttnConfig(32, 64, 4, 1)},     # 8 B -> 0 (236 regs)
            256: {AttnConfig(16, 32, 4, 2): AttnConfig(16, 32, 8, 2)}},   # 8 B -> 0 (195 regs)
        86: {64: {AttnConfig(32, 64, 4, 2): AttnConfig(32, 64, 4, 1)}}})  # 8 B -> 0 (232 regs)
    _MOD_DKDV = replace_configs(_MOD_DKDV, {
        9: {128: {AttnConfig(32, 64, 8, 2): AttnConfig(16, 64, 8, 2)}},   # 8 B -> 0 (245 regs)
        8: {128: {AttnConfig(32, 32, 4, 3): AttnConfig(32, 32, 8, 3)}}})  # 24 B -> 0 (202 regs)
    _MOD_DQ = replace_configs(_MOD_DQ, {
        9: {64: {AttnConfig(64, 64, 4, 3): AttnConfig(64, 64, 8, 3)}}})   # 8 B -> 0 (184 regs)
    _FP32_DKDV = AttnConfig(16, 32, 4, 2)  # 32x32: 432-512 B of spills on sm_80/86/90 -> 0 (108-143 regs)


# Per-sequence masks: one config per kernel and bucket, the default swapped where it spills with all
# three masks on (static report, Triton 3.8), as kernels/attention.py's _MASKED_FWD. sm_90 dK/dV d128
# keeps 64x64 w4 s2: 240 B with masks, within its MEASURED_SPILLS allowance (344 B without masks).
_MASKED_DQ = {(9, False): {256: {AttnConfig(64, 64, 4, 2): AttnConfig(64, 32, 4, 2)}},    # 32 B -> 0 (255 regs)
              (8, False): {64: {AttnConfig(128, 64, 8, 2): AttnConfig(64, 32, 4, 2)}},    # 80 B -> 0 (212 regs)
              (86, False): {64: {AttnConfig(128, 64, 8, 2): AttnConfig(64, 32, 4, 2)}}}   # 40 B -> 0
if TRITON_36:  # Triton 3.6 only (static report, fp16 and bf16): masks + softcap/ALiBi/dropout on sm_90 d128
    _MASKED_DQ[(9, True)] = {128: {AttnConfig(64, 64, 8, 3): AttnConfig(64, 32, 8, 3)}}  # 8 B -> 0 (173 regs)
_MASKED_DKDV = {}


def _masked(table, arch, mods, head_dim, cfg):
    return table.get((arch, bool(mods)), {}).get(_bucket_dim(head_dim), {}).get(cfg, cfg)


# v head dim != q/k head dim (bucket of max(D, Dv)): configs that spill there, dropped from the list
# (static report, Triton 3.8, D=192/Dv=128 fp16 and bf16). sm_90 dQ 64x64 w4 s2: 16 B (255 regs; 0 at
# D = Dv = 256) -> the list's next one, 64x32 w4 s2 (255 regs, 0 B).
_HDIMV_DROP = {(9, "dq", 256): {AttnConfig(64, 64, 4, 2)}}


def _hdimv_list(arch, which, head_dim, cfgs):
    keep = [c for c in cfgs if c not in _HDIMV_DROP.get((arch, which, _bucket_dim(head_dim)), ())]
    return keep or cfgs


def bwd_configs(cc, head_dim, dtype=torch.float16, mods=False, masks=False, head_dim_v=None):
    """(dK/dV tuning list, dQ tuning list) for compute capability ``cc`` and head dim; ``mods``:
    softcap, ALiBi or dropout active; ``masks``: key padding, seqused_k or segments active (one
    config each, see _MASKED_DQ); ``head_dim_v``: v's head dim when it differs (the lists of the
    max(head_dim, head_dim_v) bucket less the configs that spill there, see _HDIMV_DROP)."""
    if head_dim_v is not None and head_dim_v != head_dim:
        hd = max(head_dim, head_dim_v)
        bc = bwd_configs(cc, hd, dtype, mods, masks)
        return BwdConfigs(_hdimv_list(_arch(cc), "dkdv", hd, bc.dkdv), _hdimv_list(_arch(cc), "dq", hd, bc.dq))
    if masks:
        bc = bwd_configs(cc, head_dim, dtype, mods)
        arch = _arch(cc)
        return BwdConfigs([_masked(_MASKED_DKDV, arch, mods, head_dim, bc.dkdv[0])],
                          [_masked(_MASKED_DQ, arch, mods, head_dim, bc.dq[0])])
    elt = torch.empty((), dtype=dtype).element_size()
    if elt == 4:
        return BwdConfigs([_FP32_DKDV], [AttnConfig(32, 32, 4, 2)])
    if mods:
        bucket = _bucket_dim(head_dim)
        return BwdConfigs([_MOD_DKDV[_arch(cc)][bucket]], [_MOD_DQ[_arch(cc)][bucket]])
    return BwdConfigs(list(_bucket(_DKDV_CONFIGS[_arch(cc)], head_dim)), list(_bucket(_DQ_CONFIGS[_arch(cc)], head_dim)))


# -- dK / dV ---------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, stride_qn, stride_dn,
                         offs_m, offs_d, offs_dv, cols, n_q, shift, win_left, win_right, chunk, start, end, f0, f1,
                         qk_scale,
                         softcap, slope, drop_base, seed, dropout_p, drop_nk, SegS, seg_n,
                         CHUNKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr,
                         SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                         SEGMENTS: tl.constexpr):
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(Q_base, rows, stride_qn, offs_d, n_q, True, HEAD_DIM, BLOCK_D)
        lse = tl.load(L_base + rows, mask=rows < n_q, other=float("inf"))
        delta = tl.load(D_base + rows, mask=rows < n_q, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        # -- P^T for this tile (BLOCK_N, BLOCK_M)
        s_t, t_t = _scores(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION), cols[:, None],
                           (rows + shift)[None, :], qk_scale, softcap, slope, SOFTCAP, ALIBI)
        p_t = tl.exp2(s_t - lse[None, :])
        if (start_m < f0) | (start_m >= f1):  # q tile partly masked for this kv tile
            lo_row, hi_row = _row_bounds(rows, shift, win_left, win_right, chunk, CHUNKED)
            lo_row, hi_row = _seg_clip(SegS, rows, n_q, lo_row, hi_row, seg_n, SEGMENTS)
            visible = (cols[:, None] >= lo_row[None, :]) & (cols[:, None] <= hi_row[None, :]) \
                & (rows[None, :] < n_q)
            p_t = tl.where(visible, p_t, 0.0)
        do = _load_rows(DO_base, rows, stride_dn, offs_dv, n_q, True, HEAD_DIM_V, BLOCK_DV)
        # -- dV += P^T dO ; dS^T = P^T * (dP^T - Delta) ; dK += dS^T Q
        if DROPOUT:  # dV = (P o Z / (1 - p))^T dO ; dP = Z / (1 - p) o dO V^T  (Z: the kept mask)
            keep_t = _dropout_keep(seed, drop_base + rows.to(tl.int64)[None, :] * drop_nk + cols[:, None], dropout_p)
            dv = tl.dot(tl.where(keep_t, p_t * (1.0 / (1.0 - dropout_p)), 0.0).to(do.dtype), do, dv,
                        input_precision=INPUT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, Lse, Delta, CuSeqQ, CuSeqK, Alibi, KeyMask, KBounds, SeqUsedK, SegBounds,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   stride_lb, stride_lh, stride_ab, stride_mb, stride_sb,
                   seqlen_q, seqlen_k, group, qk_scale, softcap, sm_scale, win_left, win_right, chunk,
                   seed, dropout_p, drop_nq, drop_nk,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr, VARLEN: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                   DROPOUT: tl.constexpr, KPAD: tl.constexpr = False, SEQUSED: tl.constexpr = False,
                   SEGMENTS: tl.constexpr = False):
    """One (BLOCK_N kv tile, kv head, sequence) per program; grid (cdiv(max Nk, BLOCK_N), Hkv, B).
    Q/K/dK have HEAD_DIM (padded to BLOCK_D), V/dO/dV HEAD_DIM_V (padded to BLOCK_DV)."""
    start_n = tl.program_id(0)
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, n_q = _seq_info(CuSeqQ, off_b, seqlen_q, VARLEN)
    k_start, n_k = _seq_info(CuSeqK, off_b, seqlen_k, VARLEN)
    n_rows_k = n_k  # dK/dV rows written (keys past seqused_k get zeros)
    n_k = _used_keys(SeqUsedK, off_b, n_k, SEQUSED)
    shift = n_k - n_q
    SegS = SegBounds + off_b.to(tl.int64) * stride_sb
    b64 = off_b.to(tl.int64)
    qs = q_start.to(tl.int64)
    ks = k_start.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = _offs_dv(offs_d, BLOCK_D, BLOCK_DV)
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    K_base = K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh + ks * stride_kn
    V_base = V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh + ks * stride_vn
    k = _load_rows(K_base, cols, stride_kn, offs_d, n_k, True, HEAD_DIM, BLOCK_D)
    v = _load_rows(V_base, cols, stride_vn, offs_dv, n_k, True, HEAD_DIM_V, BLOCK_DV)

    # -- q rows that may see this kv tile, and rows that see all of it
    n_first = start_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, n_k) - 1
    i_first, i_last = _col_bounds(n_first, n_last, shift, win_left, win_right, chunk, CHUNKED)
    f_first, f_last = _col_bounds(n_last, n_first, shift, win_left, win_right, chunk, CHUNKED)
    if SEGMENTS:  # rows whose run reaches the tile: [start(n_first), end(n_last)]; whose run covers it:
        ok = n_first < n_k  # [start(n_last), end(n_first)] (Nq == Nk: one run table for rows and keys)
        i_first = tl.maximum(i_first, tl.load(SegS + n_first, mask=ok, other=0))
        i_last = tl.minimum(i_last, tl.load(SegS + seqlen_q + n_last, mask=ok, other=-1))
        f_first = tl.maximum(f_first, tl.load(SegS + n_last, mask=ok, other=0))
        f_last = tl.minimum(f_last, tl.load(SegS + seqlen_q + n_first, mask=ok, other=-1))
    if KPAD:  # tile outside the sequence's valid keys [first, last]: no work
        k_lo, k_hi = _key_clip(KBounds, off_b, n_first, n_last, KPAD)
        i_last = tl.where(k_lo <= k_hi, i_last, -1)
    i_last = tl.where(n_first < n_k, i_last, -1)  # tile past the end of this sequence: no work
    begin, f0, f1, end = _tile_ranges(i_first, i_last, f_first, f_last, n_q, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, group):  # the q heads sharing this kv head, in a fixed order
        off_h = (off_hk * group + g).to(tl.int64)
        Q_base = Q + b64 * stride_qb + off_h * stride_qh + qs * stride_qn
        DO_base = DO + b64 * stride_db + off_h * stride_dh + qs * stride_dn
        L_base = Lse + b64 * stride_lb + off_h * stride_lh + qs
        D_base = Delta + b64 * stride_lb + off_h * stride_lh + qs
        slope = _alibi_slope(Alibi, off_b, off_h, stride_ab, ALIBI)
        # Philox counters: ((b * Hq + h) * NQ + q_start) * NK + k_start, plus row * NK + col
        drop_base = _drop_rows(off_b, off_h, tl.num_programs(1) * group, 0, q_start, k_start, drop_nq, drop_nk, VARLEN)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, stride_qn, stride_dn,
                                      offs_m, offs_d, offs_dv, cols, n_q, shift, win_left, win_right, chunk,
                                      begin, end, f0, f1, qk_scale, softcap, slope, drop_base, seed, dropout_p,
                                      drop_nk, SegS, seqlen_q, CHUNKED, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                      BLOCK_M, INPUT_PRECISION,
                                      SOFTCAP, ALIBI, DROPOUT, SEGMENTS)
    dk = dk * sm_scale
    if KPAD:  # padded keys: invisible to every query, their rows are exactly 0
        kv_ok = _key_ok(KeyMask + b64 * stride_mb, cols, n_k)
        dk = tl.where(kv_ok[:, None], dk, 0.0)
        dv = tl.where(kv_ok[:, None], dv, 0.0)
    if SEQUSED:  # keys past seqused_k: zeros, written (the op allocates dK/dV uninitialized)
        dk = tl.where(cols[:, None] < n_k, dk, 0.0)
        dv = tl.where(cols[:, None] < n_k, dv, 0.0)
    _store_rows(DK + b64 * stride_dkb + off_hk.to(tl.int64) * stride_dkh + ks * stride_dkn, cols, stride_dkn,
                offs_d, n_rows_k, dk, HEAD_DIM, BLOCK_D)
    _store_rows(DV + b64 * stride_dvb + off_hk.to(tl.int64) * stride_dvh + ks * stride_dvn, cols, stride_dvn,
                offs_dv, n_rows_k, dv, HEAD_DIM_V, BLOCK_DV)


# -- dQ --------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, offs_n, offs_d,
                       offs_dv, n_k, lo_row, hi_row, start, end, f0, f1, qk_scale, pos_q, softcap, slope,
                       drop_rows, seed, dropout_p, KM_base,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, KPAD: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K_base, cols, stride_kn, offs_d, n_k, True, HEAD_DIM, BLOCK_D)
        v = _load_rows(V_base, cols, stride_vn, offs_dv, n_k, True, HEAD_DIM_V, BLOCK_DV)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), pos_q[:, None], cols[None, :],
                       qk_scale, softcap, slope, SOFTCAP, ALIBI)
        p = tl.exp2(s - lse[:, None])
        if (start_n < f0) | (start_n >= f1):  # kv tile partly masked for this q tile
            visible = (cols[None, :] >= lo_row[:, None]) & (cols[None, :] <= hi_row[:, None])
            p = tl.where(visible, p, 0.0)
        if KPAD:
            p = tl.where(_key_ok(KM_base, cols, n_k)[None, :], p, 0.0)
        # -- dS = P * (dO V^T - Delta) ; dQ += dS K
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, drop_rows[:, None] + cols[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, Lse, Delta, CuSeqQ, CuSeqK, Alibi, KeyMask, KBounds, SeqUsedK, SegBounds,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                 stride_dqb, stride_dqh, stride_dqn, stride_lb, stride_lh, stride_ab, stride_mb, stride_sb,
                 seqlen_q, seqlen_k, group, qk_scale, softcap, sm_scale, win_left, win_right, chunk,
                 seed, dropout_p, drop_nq, drop_nk,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr, VARLEN: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 DROPOUT: tl.constexpr, KPAD: tl.constexpr = False, SEQUSED: tl.constexpr = False,
                 SEGMENTS: tl.constexpr = False):
    """One (BLOCK_M q tile, q head, sequence) per program; grid (cdiv(max Nq, BLOCK_M), Hq, B).
    Q/K/dQ have HEAD_DIM (padded to BLOCK_D), V/dO HEAD_DIM_V (padded to BLOCK_DV)."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // group
    q_start, n_q = _seq_info(CuSeqQ, off_b, seqlen_q, VARLEN)
    k_start, n_k = _seq_info(CuSeqK, off_b, seqlen_k, VARLEN)
    n_k = _used_keys(SeqUsedK, off_b, n_k, SEQUSED)
    shift = n_k - n_q
    SegS = SegBounds + off_b.to(tl.int64) * stride_sb
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    qs = q_start.to(tl.int64)
    ks = k_start.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = _offs_dv(offs_d, BLOCK_D, BLOCK_DV)
    K_base = K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh + ks * stride_kn
    V_base = V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh + ks * stride_vn

    m_first = start_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, n_q) - 1
    lo_first, hi_first = _row_bounds(m_first, shift, win_left, win_right, chunk, CHUNKED)
    lo_last, hi_last = _row_bounds(m_last, shift, win_left, win_right, chunk, CHUNKED)
    lo_first, hi_first = _seg_clip(SegS, m_first, n_q, lo_first, hi_first, seqlen_q, SEGMENTS)
    lo_last, hi_last = _seg_clip(SegS, m_last, n_q, lo_last, hi_last, seqlen_q, SEGMENTS)
    hi_last = tl.where(m_first < n_q, hi_last, -1)
    lo_first, hi_last = _key_clip(KBounds, off_b, lo_first, hi_last, KPAD)
    begin, f0, f1, end = _tile_ranges(lo_first, hi_last, lo_last, hi_first, n_k, BLOCK_N)
    lo_row, hi_row = _row_bounds(offs_m, shift, win_left, win_right, chunk, CHUNKED)
    lo_row, hi_row = _seg_clip(SegS, offs_m, n_q, lo_row, hi_row, seqlen_q, SEGMENTS)
    hi_row = tl.minimum(hi_row, n_k - 1)

    q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh + qs * stride_qn, offs_m, stride_qn, offs_d, n_q,
                   True, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + b64 * stride_db + h64 * stride_dh + qs * stride_dn, offs_m, stride_dn, offs_dv, n_q,
                    True, HEAD_DIM_V, BLOCK_DV)
    L_off = b64 * stride_lb + h64 * stride_lh + qs
    lse = tl.load(Lse + L_off + offs_m, mask=offs_m < n_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + L_off + offs_m, mask=offs_m < n_q, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slope = _alibi_slope(Alibi, off_b, off_h, stride_ab, ALIBI)
    drop_rows = _drop_rows(off_b, off_h, tl.num_programs(1), offs_m, q_start, k_start, drop_nq, drop_nk, VARLEN)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, offs_n, offs_d,
                            offs_dv, n_k, lo_row, hi_row, begin, end, f0, f1, qk_scale, offs_m + shift, softcap, slope,
                            drop_rows, seed, dropout_p, KeyMask + b64 * stride_mb, HEAD_DIM, BLOCK_D, HEAD_DIM_V,
                            BLOCK_DV, BLOCK_N,
                            INPUT_PRECISION, SOFTCAP, ALIBI, DROPOUT, KPAD)
    dq = dq * sm_scale
    _store_rows(DQ + b64 * stride_dqb + h64 * stride_dqh + qs * stride_dqn, offs_m, stride_dqn, offs_d, n_q,
                dq, HEAD_DIM, BLOCK_D)


# -- launchers ---------------------------------------------------------------------------------
def _mods(cx):
    return cx["SOFTCAP"] or cx["ALIBI"] or cx["DROPOUT"]


def _masks(cx):
    return cx["KPAD"] or cx["SEQUSED"] or cx["SEGMENTS"]


def _common(q, k, v, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, sm_scale, win_left, win_right, chunk_size,
            softcap, alibi_slopes, lse, dropout_p=0.0, seed=0, masks=None):
    """Arguments shared by both backward kernels: (varlen, trailing scalars, constexprs, the pointer
    arguments after Delta). masks: ``mask_args`` keywords (key_mask, key_bounds, ...)."""
    varlen = cu_seqlens_q is not None
    kscale, kcap, alibi, stride_ab, has_cap, has_alibi = score_args(sm_scale * LOG2E, softcap, alibi_slopes, lse)
    mptrs, mstrides, mcx = mask_args(lse, **(masks or {}))
    tail = (stride_ab, *mstrides, seqlen_q, seqlen_k, q.shape[1] // k.shape[1], kscale, kcap, sm_scale, win_left,
            win_right, chunk_size or 1, *dropout_args(q, k, varlen, dropout_p, seed))
    cx = dict(HEAD_DIM=q.shape[-1], BLOCK_D=block_d(q.shape[-1]), HEAD_DIM_V=v.shape[-1],
              BLOCK_DV=block_d(v.shape[-1]), CHUNKED=chunk_size is not None,
              VARLEN=varlen, INPUT_PRECISION=_input_precision(q.dtype), SOFTCAP=has_cap, ALIBI=has_alibi,
              DROPOUT=dropout_p > 0, **mcx)
    cus = (cu_seqlens_q, cu_seqlens_k, alibi) if varlen else (q, q, alibi)
    return varlen, tail, cx, cus + mptrs


def attn_bwd_dkdv(q, k, v, do, dk, dv, lse, delta, *, batch, seqlen_q, seqlen_k, max_seqlen_k,
                  cu_seqlens_q=None, cu_seqlens_k=None, sm_scale, win_left, win_right, chunk_size=None,
                  softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0, config=None, interpret=False, **masks):
    """Launch ``_attn_bwd_dkdv`` on canonical 4-D views (see attn_fwd; v/do/dv may have a head dim
    Dv != D, configs: ``bwd_configs(.., head_dim_v=Dv)``); dk/dv shaped like k/v.
    masks: key_mask / key_bounds / seqused_k / segment_bounds (see ``attention_common.mask_args``)."""
    varlen, tail, cx, cus = _common(q, k, v, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, sm_scale,
                                    win_left, win_right, chunk_size, softcap, alibi_slopes, lse, dropout_p, seed,
                                    masks)
    args = (q, k, v, do, dk, dv, lse, delta, *cus, *canonical_strides(q, varlen), *canonical_strides(k, varlen),
            *canonical_strides(v, varlen), *canonical_strides(do, varlen), *canonical_strides(dk, varlen), *canonical_strides(dv, varlen),
            *lse_strides(lse, varlen), *tail)
    _launch_bwd(_attn_bwd_dkdv, "dkdv", q, args, cx, max_seqlen_k, "BLOCK_N", k.shape[1], batch, config, interpret)


def attn_bwd_dq(q, k, v, do, dq, lse, delta, *, batch, seqlen_q, seqlen_k, max_seqlen_q,
                cu_seqlens_q=None, cu_seqlens_k=None, sm_scale, win_left, win_right, chunk_size=None,
                softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0, config=None, interpret=False, **masks):
    """Launch ``_attn_bwd_dq`` on canonical 4-D views (see attn_fwd); dq shaped like q; masks as
    ``attn_bwd_dkdv``."""
    varlen, tail, cx, cus = _common(q, k, v, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, sm_scale,
                                    win_left, win_right, chunk_size, softcap, alibi_slopes, lse, dropout_p, seed,
                                    masks)
    args = (q, k, v, do, dq, lse, delta, *cus, *canonical_strides(q, varlen), *canonical_strides(k, varlen),
            *canonical_strides(v, varlen), *canonical_strides(do, varlen), *canonical_strides(dq, varlen),
            *lse_strides(lse, varlen), *tail)
    _launch_bwd(_attn_bwd_dq, "dq", q, args, cx, max_seqlen_q, "BLOCK_M", q.shape[1], batch, config, interpret)


def _launch_bwd(kernel, which, q, args, cx, n_rows, block, heads, batch, config, interpret):
    """Config choice and launch shared by dK/dV (``which`` "dkdv": programs over kv rows, ``block``
    "BLOCK_N") and dQ ("dq": over q rows, "BLOCK_M"): explicit config, autotuning, or the heuristic."""
    def tuning_list():
        return getattr(bwd_configs(_cc(q), cx["HEAD_DIM"], q.dtype, _mods(cx), _masks(cx), cx["HEAD_DIM_V"]), which)

    if config is None and autotune_enabled():
        grid = lambda meta: (triton.cdiv(n_rows, meta[block]), heads, batch)  # noqa: E731
        return _launch(_autotuned(kernel, tuning_list(), interpret), grid, args, cx, None, interpret,
                       autotune_configs=True)
    if config is None:
        config = getattr(SMOKE_BWD, which) if interpret else tuning_list()[0]
    cx.update(BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N)
    _launch(kernel, (triton.cdiv(n_rows, getattr(config, block)), heads, batch), args, cx, config, interpret)


# -- static report (collected by kernels/attention_aot.py) ---------------------------------------
def _bwd_case(cc, which, d, dt, cfg, dv=None, **flags):
    """AotCase of the dK/dV (``which`` "dkdv") or dQ ("dq") kernel for one config; ``dv``: v head dim
    (None: d; named "d{d}v{dv}" when it differs); ``flags``: constexpr overrides (CHUNKED, SOFTCAP, ...),
    named in the case's tag list."""
    kernel = _attn_bwd_dkdv if which == "dkdv" else _attn_bwd_dq
    cx, sig, body = aot_case_parts(kernel, d, dv, dt, cfg, flags)
    return AotCase(f"attn_bwd_{which}[{body}]", kernel, sig, cx, cfg.num_warps, cfg.num_stages,
                   tensor_core=dt != "fp32", attrs=aot_attrs(kernel, sig),
                   spill_ok=MEASURED_SPILLS.get((_arch(cc), which, cfg), 0) if _plain_scores(flags) else 0)


def _plain_scores(flags):
    """Whether a case keeps the plain score path (no softcap/ALiBi/dropout): masks, chunks and varlen
    only narrow ranges and mask elements, so a GPU-measured spill allowance carries over."""
    return not any(flags.get(f) for f in ("SOFTCAP", "ALIBI", "DROPOUT"))


def aot_cases_bwd(cc, d, dtype, dt):
    """The plain dK/dV and dQ configs of ``bwd_configs(cc, d, dtype)``, as static-report cases."""
    cfgs = bwd_configs(cc, d, dtype)
    return [_bwd_case(cc, which, d, dt, cfg) for which, lst in (("dkdv", cfgs.dkdv), ("dq", cfgs.dq)) for cfg in lst]

"""Flash-decoding in Triton: attention of a few new query tokens over a KV cache, split-K.

Layouts (flash-attn's ``flash_attn_with_kvcache``): q (B, Sq, Hq, D), caches (B, S_max, Hkv, D) and
(B, S_max, Hkv, Dv) (Dv may differ from D, as DeepSeek's MLA 192/128; out is (B, Sq, Hq, Dv)), any strides with a unit last dim; ``SeqLens`` int32 (B,) = valid cache length *after* the new
tokens were appended (the op appends k_new/v_new in place before launching). Query i of batch b
has aligned position p = i + L_b - Sq and sees key j iff p - left <= j <= p + right and
0 <= j < L_b (FlashAttention's bottom-right conventions, as ``kernels/attention.py``); softcap and
ALiBi through the same ``_scores`` helper.

``_decode_partial``: one program per (row block, kv split) x kv head x batch. The rows of a block
are the (q head of the GQA group, query token) pairs of one kv head -- ``group * Sq`` rows packed
into BLOCK_M >= 16 so K/V tiles are read once per group and still feed tensor cores. Split s
covers cache positions [s * split_len, (s + 1) * split_len) (split_len a multiple of BLOCK_N), so
long caches spread over many SMs even at batch 1 (flash-decoding). With one split the program
writes the final output; otherwise fp32 partial outputs (normalized) and partial LSEs, merged by
``_decode_combine``: out = sum_s exp(lse_s - lse) o_s with lse = logsumexp_s lse_s. Cache rows
at or past L_b are never read (their contents may be garbage or NaN); empty splits store LSE
-inf and output 0 and weigh nothing in the merge.
"""
import torch
import triton
import triton.language as tl

from ._aot import AotCase
from .attention_common import (BEFORE_38, LOG2E, AttnConfig, _input_precision, _launch, _scores, aot_attrs,
                               aot_signature, block_d, score_args)

__all__ = ["attn_decode", "decode_config", "pick_num_splits", "aot_cases_decode"]


@triton.jit
def _decode_partial(Q, K, V, Out, Lse, SeqLens, Alibi, CacheIdx, LeftPad, BlockTable, KeyMask, KeyBounds,
                    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                    stride_vb, stride_vn, stride_vh,
                    stride_pb, stride_ph, stride_pn, stride_ps, stride_lb, stride_lh, stride_ln, stride_ls,
                    stride_ab, bt_stride, page_size, stride_mb,
                    seqlen_q, group, num_splits, split_len, qk_scale, softcap, win_left, win_right,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    CACHE_IDX: tl.constexpr, LEFTPAD: tl.constexpr, PAGED: tl.constexpr, KEY_MASK: tl.constexpr):
    """Grid (row blocks * num_splits, Hkv, B). Out/Lse: partials (B, Hq, Sq, splits[, D]) fp32, or
    with one split the final (B, Sq, Hq, D) output and (B, Hq, Sq) LSE (stride_ps/ls unused).
    CACHE_IDX: batch b reads cache row CacheIdx[b]. LEFTPAD: batch b's keys start at cache position
    LeftPad[b] (key j of the attention is cache position LeftPad[b] + j). PAGED: cache position t
    of batch b is row t % page_size of page BlockTable[b, t // page_size] (K/V are (pages, page_size,
    Hkv, D)); the table is read once per key row of a tile. KEY_MASK: KeyMask (B, S_max) uint8 over cache
    positions (0 = key invisible), read per kv tile; KeyBounds int32 (B, 2) = first and last cache
    positions with a nonzero mask ([S_max, -1] when none; ``key_bounds``), computed on the device,
    narrow the tile range so fully masked leading/trailing tiles are never read."""
    pid = tl.program_id(0)
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)
    split = pid % num_splits
    m_block = pid // num_splits
    b64 = off_b.to(tl.int64)
    if CACHE_IDX:
        cb64 = tl.load(CacheIdx + off_b).to(tl.int64)
    else:
        cb64 = b64
    if LEFTPAD:
        pad = tl.load(LeftPad + off_b)
    else:
        pad = 0
    n_k = tl.load(SeqLens + off_b) - pad
    shift = n_k - seqlen_q

    r = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < group * seqlen_q
    qi = r % seqlen_q
    head = off_hk * group + r // seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DIM_V
    q_ptrs = Q + b64 * stride_qb + qi.to(tl.int64)[:, None] * stride_qn + head.to(tl.int64)[:, None] * stride_qh \
        + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if ALIBI:  # per row: the rows of a block belong to different q heads
        slope = (tl.load(Alibi + b64 * stride_ab + head, mask=row_ok, other=0.0) * 1.4426950408889634)[:, None]
    else:
        slope = 0.0

    # -- visible range of the block's rows, intersected with this split
    pos = qi + shift
    lo_row = pos - win_left
    hi_row = tl.minimum(pos + win_right, n_k - 1)
    lo = tl.maximum(shift - win_left, 0)
    hi = tl.minimum(shift + seqlen_q - 1 + win_right, n_k - 1)
    if KEY_MASK:  # key index j is cache position j + pad
        lo = tl.maximum(lo, tl.load(KeyBounds + off_b * 2) - pad)
        hi = tl.minimum(hi, tl.load(KeyBounds + off_b * 2 + 1) - pad)
    s0 = split * split_len
    start = tl.maximum(s0, (lo // BLOCK_N) * BLOCK_N)
    end = tl.minimum(s0 + split_len, hi + 1)

    if PAGED:  # pages are addressed per row below
        K_base = K + off_hk.to(tl.int64) * stride_kh
        V_base = V + off_hk.to(tl.int64) * stride_vh
    else:
        K_base = K + cb64 * stride_kb + off_hk.to(tl.int64) * stride_kh
        V_base = V + cb64 * stride_vb + off_hk.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        t = cols + pad  # cache positions of the tile's keys
        if KEY_MASK:  # masked keys are never read (their rows may hold garbage or NaN)
            key_ok = (cols < n_k) & (tl.load(KeyMask + b64 * stride_mb + t, mask=cols < n_k, other=0) != 0)
        else:
            key_ok = cols < n_k
        k_mask = key_ok[:, None] & d_ok[None, :]
        if PAGED:
            page = tl.load(BlockTable + b64 * bt_stride + t // page_size, mask=key_ok, other=0).to(tl.int64)
            k_rows = page * stride_kb + (t % page_size).to(tl.int64) * stride_kn
            v_rows = page * stride_vb + (t % page_size).to(tl.int64) * stride_vn
        else:
            k_rows = t.to(tl.int64) * stride_kn
            v_rows = t.to(tl.int64) * stride_vn
        k = tl.load(K_base + k_rows[:, None] + offs_d[None, :], mask=k_mask, other=0.0)
        s, _t = _scores(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), pos[:, None], cols[None, :],
                        qk_scale, softcap, slope, SOFTCAP, ALIBI)
        visible = (cols[None, :] >= lo_row[:, None]) & (cols[None, :] <= hi_row[:, None])
        if KEY_MASK:
            visible = visible & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_base + v_rows[:, None] + offs_dv[None, :], mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = Out + b64 * stride_pb + head.to(tl.int64)[:, None] * stride_ph + qi.to(tl.int64)[:, None] * stride_pn \
        + split.to(tl.int64) * stride_ps + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    l_ptrs = Lse + b64 * stride_lb + head.to(tl.int64) * stride_lh + qi.to(tl.int64) * stride_ln \
        + split.to(tl.int64) * stride_ls
    tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit
def _decode_combine(Part, PartLse, Out, Lse,
                    stride_pb, stride_ph, stride_pn, stride_ps, stride_lb, stride_lh, stride_ln, stride_ls,
                    stride_ob, stride_on, stride_oh, stride_fb, stride_fh, num_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the split partials of one (query token, q head, batch); grid (Sq, Hq, B)."""
    off_n = tl.program_id(0).to(tl.int64)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(PartLse + off_b * stride_lb + off_h * stride_lh + off_n * stride_ln + offs_s * stride_ls,
                  mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2((lse - m_safe) * 1.4426950408889634)
    total = tl.sum(w, 0)
    o = tl.load(Part + off_b * stride_pb + off_h * stride_ph + off_n * stride_pn + offs_s[:, None] * stride_ps
                + offs_d[None, :], mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(o * w[:, None], 0) / total_safe
    lse_out = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total_safe))
    tl.store(Out + off_b * stride_ob + off_n * stride_on + off_h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(Lse + off_b * stride_fb + off_h * stride_fh + off_n, lse_out)


# -- configs and launch -----------------------------------------------------------------------
def decode_config(head_dim, group_rows):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a problem with ``group_rows`` = group * Sq
    query rows per kv head (same list on sm_80 and sm_90; see aot_cases_decode)."""
    bm = min(64, max(16, triton.next_power_of_2(group_rows)))
    bd = block_d(head_dim)
    warps = 8 if bm == 64 and bd >= 128 else 4  # 64 rows x d128 on 4 warps spilled 32 B on sm_80
    if bd <= 128:
        return bm, 64, warps, 3
    if bm == 64 and BEFORE_38:  # 64 x d256 on 8 warps spills on Triton 3.6 (sm_90 144 B, sm_86 8 B) and
        warps = 16              # 3.7 (sm_90 136 B, sm_86 56 B, sm_80 48 B); 16 warps: 0, 115-128 regs
    return bm, 32, warps, 2


def pick_num_splits(batch, hkv, m_blocks, cache_len, block_n, num_sms):
    """Splits so that about 2 waves of programs cover the SMs, each split >= 2 kv tiles, <= 64.
    Uses the cache capacity (no host sync on cache_seqlens): splits past the valid length exit."""
    programs = batch * hkv * m_blocks
    if programs >= num_sms:
        return 1
    max_splits = max(1, cache_len // (2 * block_n))
    return max(1, min(64, max_splits, triton.cdiv(2 * num_sms, programs)))


def attn_decode(q, k_cache, v_cache, seqlens, out, lse, *, softmax_scale, win_left, win_right, softcap=0.0,
                alibi_slopes=None, num_splits=None, config=None, interpret=False, cache_batch_idx=None,
                cache_leftpad=None, block_table=None, key_mask=None, key_bounds=None):
    """Launch the decode kernels. q (B, Sq, Hq, D), out (B, Sq, Hq, Dv), k_cache (B_cache, S_max, Hkv, D),
    v_cache (B_cache, S_max, Hkv, Dv) (Dv may differ from D: MLA's 192/128), seqlens int32 (B,) valid lengths (after the append), lse fp32 (B, Hq, Sq). num_splits None: ``pick_num_splits``.
    cache_batch_idx int32 (B,): cache row of each batch entry; cache_leftpad int32 (B,): first valid
    cache position; block_table int32 (B, pages per sequence): paged caches (pages, page_size, Hkv, D),
    S_max = pages per sequence * page_size. key_mask uint8 (B, S_max) with unit last stride and key_bounds
    int32 (B, 2) contiguous: per-key padding over cache positions (see ``_decode_partial``)."""
    b, sq, hq, d = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    s_max = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    group = hq // hkv
    bm, bn, warps, stages = config or decode_config(max(d, dv), group * sq)
    m_blocks = triton.cdiv(group * sq, bm)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = pick_num_splits(b, hkv, m_blocks, s_max, bn, sms)
    num_splits = max(1, min(num_splits, triton.cdiv(s_max, bn)))
    split_len = triton.cdiv(triton.cdiv(s_max, num_splits), bn) * bn
    num_splits = triton.cdiv(s_max, split_len)
    kscale, kcap, alibi, stride_ab, has_cap, has_alibi = score_args(softmax_scale * LOG2E, softcap, alibi_slopes, lse)
    if num_splits == 1:
        part, plse = out, lse
        pstrides = (out.stride(0), out.stride(2), out.stride(1), 0)
        lstrides = (lse.stride(0), lse.stride(1), lse.stride(2), 0)
    else:
        part = torch.empty(b, hq, sq, num_splits, dv, dtype=torch.float32, device=q.device)
        plse = torch.empty(b, hq, sq, num_splits, dtype=torch.float32, device=q.device)
        pstrides = (part.stride(0), part.stride(1), part.stride(2), part.stride(3))
        lstrides = plse.stride()
    args = (q, k_cache, v_cache, part, plse, seqlens, alibi,
            seqlens if cache_batch_idx is None else cache_batch_idx,
            seqlens if cache_leftpad is None else cache_leftpad,
            seqlens if block_table is None else block_table, seqlens if key_mask is None else key_mask,
            seqlens if key_bounds is None else key_bounds, q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), *pstrides, *lstrides, stride_ab, block_table.stride(0) if paged else 0, page_size,
            0 if key_mask is None else key_mask.stride(0), sq, group, num_splits, split_len, kscale, kcap, win_left,
            win_right)
    cx = dict(HEAD_DIM=d, BLOCK_D=block_d(d), HEAD_DIM_V=dv, BLOCK_DV=block_d(dv), BLOCK_M=bm, BLOCK_N=bn,
              SOFTCAP=has_cap, ALIBI=has_alibi,
              INPUT_PRECISION=_input_precision(q.dtype), CACHE_IDX=cache_batch_idx is not None,
              LEFTPAD=cache_leftpad is not None, PAGED=paged, KEY_MASK=key_mask is not None)
    _launch(_decode_partial, (m_blocks * num_splits, hkv, b), args, cx, AttnConfig(bm, bn, warps, stages), interpret)
    if num_splits > 1:
        cargs = (part, plse, out, lse, *pstrides, *lstrides, out.stride(0), out.stride(1), out.stride(2),
                 lse.stride(0), lse.stride(1), num_splits)
        ccx = dict(HEAD_DIM=dv, BLOCK_D=block_d(dv), BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
        _launch(_decode_combine, (sq, hq, b), cargs, ccx, AttnConfig(0, 0, 4, 1), interpret)
    return num_splits


# -- static report (collected by kernels/attention_aot.py's aot_cases) ------------------------------
def _decode_signature(dt):
    sig = aot_signature(_decode_partial, dt)
    sig.update(HEAD_DIM_V="constexpr", BLOCK_DV="constexpr", CacheIdx="*i32", LeftPad="*i32", BlockTable="*i32",
               KeyMask="*u8", KeyBounds="*i32", CACHE_IDX="constexpr", LEFTPAD="constexpr", PAGED="constexpr", KEY_MASK="constexpr")
    return sig


def aot_cases_decode(cc):
    """Per head dim: the 16-row block (MHA / GQA decode) writing fp32 split partials, the same from a
    paged cache through a block table, the 64-row block (MQA, several new tokens) writing the output
    directly, the 16-row block with softcap + ALiBi + cache_batch_idx + left padding + key mask (bf16), and the
    combine kernel at 64 splits; and MLA's q/k 192, v 128 (plain cases). Same configs on sm_80 and sm_90."""
    cases = []
    for d, dv in ((64, 64), (128, 128), (256, 256), (192, 128)):
        for dt, rows, split, mods, paged in (("fp16", 8, True, False, False), ("fp16", 8, True, False, True),
                                             ("fp16", 64, False, False, False), ("bf16", 8, True, True, False)):
            if d != dv and (mods or paged):
                continue
            bm, bn, w, st = decode_config(max(d, dv), rows)
            cx = dict(HEAD_DIM=d, BLOCK_D=block_d(d), HEAD_DIM_V=dv, BLOCK_DV=block_d(dv), BLOCK_M=bm, BLOCK_N=bn,
                      SOFTCAP=mods, ALIBI=mods,
                      INPUT_PRECISION="tf32", CACHE_IDX=mods, LEFTPAD=mods, PAGED=paged, KEY_MASK=mods)
            sig = _decode_signature(dt)
            if split:
                sig["Out"] = "*fp32"
            tag = (",split" if split else "") + (",paged" if paged else "") + \
                (",softcap,alibi,cache_idx,leftpad,key_mask" if mods else "")
            cases.append(AotCase(f"attn_decode[{dt},d{d}{'' if dv == d else f'/{dv}'},bm{bm},bn{bn},w{w},s{st}{tag}]", _decode_partial,
                                 sig, cx, w, st, attrs=aot_attrs(_decode_partial, sig)))
        if d != dv:
            continue
        sig = aot_signature(_decode_combine, "bf16")
        cases.append(AotCase(f"attn_decode_combine[bf16,d{d},s64]", _decode_combine, sig,
                             dict(HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_S=64), 4, 1, tensor_core=False,
                             attrs=aot_attrs(_decode_combine, sig)))
    return cases

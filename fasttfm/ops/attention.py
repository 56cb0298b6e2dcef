"""Attention as torch.library custom ops (``fasttfm::attn_fwd``, ``fasttfm::attn_bwd``) with fake
implementations and autograd, plus the public ``attention()`` and ``scaled_dot_product_attention()``.

Device dispatch: CUDA tensors run the Triton kernels (``kernels/attention.py``,
``kernels/attention_bwd.py``); CPU tensors run a PyTorch path in fp32 math (aten's CPU flash
kernel for plain full/causal problems, else a dense reference with the explicit mask), or, under
``fasttfm.emulate()`` / ``FASTTFM_EMULATE=1``, the same Triton kernels through Triton's interpreter.
"""
from typing import Optional

import torch
from torch import Tensor

from fasttfm._env import emulate_enabled

from ._attention_checks import _canon, _check_cu, _check_inputs, _check_masks, _check_slopes, _check_window
from ._attention_masks import _kernel_masks, _runs, _visible, _visible_batched, key_bounds, segment_bounds  # noqa: F401
from ._autocast import autocast_dtype, keep, register_autocast, register_lowp_autocast

from fasttfm.kernels import attention as _kf, attention_bwd as _kb  # noqa: E402  (kernels/ in a checkout)

__all__ = ["attention", "scaled_dot_product_attention"]

UNBOUNDED = _kf.UNBOUNDED  # window side with no limit, inside the ops
_LAYOUTS = ("bhnd", "bnhd", "thd")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# -- shapes ----------------------------------------------------------------------------------
def _out_shape(q: Tensor, v: Tensor):
    """Shape of the output: q's, with v's head dim (the last dim in every layout)."""
    return (*q.shape[:-1], v.shape[-1])


def _lse_shape(q: Tensor, layout: str):
    if layout == "thd":
        return (q.shape[1], q.shape[0])
    q4 = _canon(q, layout)
    return (q4.shape[0], q4.shape[1], q4.shape[2])


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _sequences(cu_q, cu_k, q4, k4, seqused=None):
    """[(b, q0, q1, k0, k1)] of the problem: one dense entry, or one per packed sequence (varlen with
    seqused_k: keys k0 .. k0 + min(seqused_k[i], k1 - k0), a host read of the CPU path)."""
    if cu_q is None:
        return [(slice(None), 0, q4.shape[2], 0, k4.shape[2])]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    used = [None] * (len(cq) - 1) if seqused is None else seqused.tolist()
    ends = [ck[i + 1] if used[i] is None else ck[i] + min(used[i], ck[i + 1] - ck[i]) for i in range(len(cq) - 1)]
    return [(slice(0, 1), cq[i], cq[i + 1], ck[i], ends[i]) for i in range(len(cq) - 1)]


def _aten_causal(n, m, left, right, chunk, softcap, slopes, dropout_p):
    """``is_causal`` for aten's CPU flash kernel when it computes exactly this problem's mask, else None.

    aten's kernel (fp32 math, blocked online softmax, GQA aware) is the fast CPU path for the plain
    cases: no window, or causal with Nq == Nk (where SDPA's top-left alignment equals ours, bottom-
    right); no chunks, softcap, ALiBi or dropout. Everything else takes the dense reference below."""
    if n == 0 or m == 0 or chunk or softcap or slopes is not None or dropout_p > 0 or left != UNBOUNDED:
        return None
    if right == UNBOUNDED:
        return False
    return True if right == 0 and n == m else None


def _cpu_probs(q, k, lse, vis, scale, g, softcap=0.0, slopes=None, t_out=None, shift=None):
    """Scores and probabilities (fp32) of one problem; q (B, Hq, n, D), k (B, Hkv, m, D).
    vis: bool mask broadcastable to (B, Hkv, g, n, m). softcap: s = cap * tanh(s / cap) (tanh
    stored in t_out[0] for the gradient); slopes: fp32 (B or 1, Hq) ALiBi slopes, bias
    -slope * |i + shift - j| added after the cap (shift: m - n, or a (B, 1, 1, 1, 1) tensor)."""
    b, hq, n, d = q.shape
    m = k.shape[2]
    qg = q.float().reshape(b, hq // g, g, n, d)
    s = torch.einsum("bhgnd,bhmd->bhgnm", qg, k.float()) * scale
    if softcap:
        t = torch.tanh(s / softcap)
        if t_out is not None:
            t_out.append(t)
        s = t * softcap
    if slopes is not None:
        shift = m - n if shift is None else shift
        dist = (torch.arange(n, device=q.device)[:, None] + shift - torch.arange(m, device=q.device)[None, :]).abs()
        s = s - slopes.float().reshape(slopes.shape[0], hq // g, g, 1, 1) * dist
    s = s.masked_fill(~vis, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, -1)
    else:
        lse = lse.reshape(b, hq // g, g, n)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return qg, p, lse


# -- dropout: Triton's Philox, replicated in torch ------------------------------------------------
_M32 = 0xFFFFFFFF


def philox_keep(seed: int, offset: Tensor, dropout_p: float) -> Tensor:
    """Bool keep mask, bit-identical to the kernels' ``_dropout_keep``: Philox-4x32-10 of counter
    (offset lo, offset hi, 0, 0) and key (seed lo, seed hi) as ``tl.rand`` computes it, its first
    word mapped to U(0, 1) as ``uint_to_uniform_float``, kept iff >= dropout_p (fp32). offset int64."""
    c0, c1 = offset & _M32, (offset >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        p0, p1 = c2 * 0xCD9E8D57, c0 * 0xD2511F53  # wraps mod 2**64: bits 0..63 exact
        c0, c1, c2, c3 = ((p0 >> 32) & _M32) ^ c1 ^ k0, p0 & _M32, ((p1 >> 32) & _M32) ^ c3 ^ k1, p1 & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x).to(torch.int32).float()
    u = x * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return u >= torch.tensor(dropout_p, dtype=torch.float32)


def _keep_mask(seed, p, b_idx, hq, q0, n, k0, m, nq_tot, nk_tot, varlen, device):
    """(len(b_idx), Hq, n, m) keep mask of one problem: counters ((b * Hq + h) * NQ + q0 + i) * NK + k0 + j
    (varlen: b = 0, q0/k0 the packed starts, NQ/NK the packed totals)."""
    bs = torch.tensor([0] if varlen else b_idx, dtype=torch.int64, device=device)
    h = torch.arange(hq, dtype=torch.int64, device=device)
    bh = bs[:, None] * hq + h[None, :]
    rows = q0 + torch.arange(n, dtype=torch.int64, device=device)
    cols = k0 + torch.arange(m, dtype=torch.int64, device=device)
    off = ((bh[:, :, None] * nq_tot + rows[None, None, :]) * nk_tot)[..., None] + cols
    return philox_keep(seed, off, p)


# -- custom ops ------------------------------------------------------------------------------
@torch.library.custom_op("fasttfm::attn_fwd", mutates_args=(), device_types="cpu")
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
             max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
             chunk_size: int, layout: str, softcap: float = 0.0,
             alibi_slopes: Optional[Tensor] = None, dropout_p: float = 0.0, seed: int = 0,
             key_padding_mask: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
             segment_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out, lse). Window sides are UNBOUNDED (2**30) for no limit and may be negative (any
    integer offset); chunk_size 0 = no chunking. out: q's shape with v's head dim, contiguous; lse fp32.
    softcap 0 = off; alibi_slopes fp32 (Hq,) or (B, Hq); dropout_p with Philox ``seed`` (the LSE is
    that of the undropped softmax). Dense layouts only: key_padding_mask bool (B, Nk) (True =
    attend), seqused_k int32 (B,), segment_ids integer (B, N) (see ``attention``)."""
    return _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     window_left, window_right, chunk_size, layout, softcap, alibi_slopes, dropout_p, seed,
                     key_padding_mask, seqused_k, segment_ids)


def _slopes_of(slopes, b, varlen_index=None):
    """(B-or-1, Hq) slopes for the CPU path's batch slice ``b`` (dense) or sequence ``varlen_index``."""
    if slopes is None:
        return None
    if slopes.dim() == 1:
        return slopes[None]
    return slopes[varlen_index:varlen_index + 1] if varlen_index is not None else slopes[b]


def _seq_keep(seed, p, b, idx, q4, k4, q0, q1, k0, k1, varlen, g):
    """Keep mask of one CPU-path problem, shaped (B, Hkv, g, n, m) like ``_cpu_probs``'s P."""
    b_idx = [0] if varlen else list(range(q4.shape[0]))
    keep = _keep_mask(seed, p, b_idx, q4.shape[1], q0, q1 - q0, k0, k1 - k0, q4.shape[2], k4.shape[2],
                      varlen, q4.device)
    return keep.reshape(keep.shape[0], q4.shape[1] // g, g, q1 - q0, k1 - k0)


def _fwd_impl(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, chunk, layout, softcap=0.0, slopes=None,
              dropout_p=0.0, seed=0, kpm=None, seqused=None, seg=None):
    # varlen: rows past cu_seqlens_q[-1] belong to no sequence and keep 0 / -inf
    new = torch.zeros if cu_q is not None else torch.empty
    out = new(_out_shape(q, v), dtype=q.dtype, device=q.device)
    lse = torch.full(_lse_shape(q, layout), float("-inf"), device=q.device) if cu_q is not None else \
        torch.empty(_lse_shape(q, layout), dtype=torch.float32, device=q.device)
    q4, k4, v4, o4 = (_canon(t, layout) for t in (q, k, v, out))
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    if q.is_cuda or emulate_enabled():
        varlen = cu_q is not None
        with torch.cuda.device(q.device) if q.is_cuda else _nullctx():
            _kf.attn_fwd(q4, k4, v4, o4, lse, batch=cu_q.numel() - 1 if varlen else q4.shape[0],
                         seqlen_q=0 if varlen else q4.shape[2], seqlen_k=0 if varlen else k4.shape[2],
                         max_seqlen_q=max_q, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                         qk_scale=scale * _kf.LOG2E, win_left=left, win_right=right,
                         chunk_size=chunk or None, softcap=softcap, alibi_slopes=slopes, dropout_p=dropout_p,
                         seed=seed, interpret=not q.is_cuda, **_kernel_masks(kpm, seqused, seg))
        return out, lse
    lse4 = lse.unsqueeze(0) if layout == "thd" else lse
    g = q4.shape[1] // k4.shape[1]
    same_d = q4.shape[-1] == v4.shape[-1]  # aten's CPU flash kernel needs one head dim
    if cu_q is None and (kpm is not None or seqused is not None or seg is not None):
        _cpu_fwd_masked(q4, k4, v4, o4, lse4, scale, left, right, chunk, softcap, slopes, dropout_p, seed,
                        kpm, seqused, seg)
        return out, lse
    for idx, (b, q0, q1, k0, k1) in enumerate(_sequences(cu_q, cu_k, q4, k4, seqused)):
        causal = _aten_causal(q1 - q0, k1 - k0, left, right, chunk, softcap, slopes, dropout_p)
        if causal is not None and same_d:
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *(t[b, :, s0:s1].float() for t, s0, s1 in ((q4, q0, q1), (k4, k0, k1), (v4, k0, k1))),
                0.0, causal, scale=scale)
            o4[b, :, q0:q1] = o.to(q.dtype)
            lse4[b, :, q0:q1] = l
            continue
        vis = _visible(q1 - q0, k1 - k0, left, right, chunk, q.device)
        sl = _slopes_of(slopes, b, idx if cu_q is not None else None)
        _, p, l = _cpu_probs(q4[b, :, q0:q1], k4[b, :, k0:k1], None, vis, scale, g, softcap, sl)
        if dropout_p > 0:
            p = p * _seq_keep(seed, dropout_p, b, idx, q4, k4, q0, q1, k0, k1, cu_q is not None, g) / (1 - dropout_p)
        o = torch.einsum("bhgnm,bhmd->bhgnd", p, v4[b, :, k0:k1].float())
        o4[b, :, q0:q1] = o.flatten(1, 2).to(q.dtype)
        lse4[b, :, q0:q1] = l.flatten(1, 2)
    return out, lse


def _mask_bias(vis):
    """fp32 (B, 1, n, m) additive bias (0 / -inf) of a (B, 1, 1, n, m) visibility mask, for aten's kernel."""
    return torch.zeros(vis.shape[0], 1, *vis.shape[3:], device=vis.device).masked_fill(~vis[:, 0], float("-inf"))


def _cpu_fwd_masked(q4, k4, v4, o4, lse4, scale, left, right, chunk, softcap, slopes, dropout_p, seed, kpm,
                    seqused, seg):
    """CPU forward with per-sequence masks (dense layouts), fp32 math: aten's CPU flash kernel with the
    mask as an additive bias when there are no score modifiers, else the dense reference math."""
    g = q4.shape[1] // k4.shape[1]
    n, m = q4.shape[2], k4.shape[2]
    vis, shift = _visible_batched(n, m, left, right, chunk, kpm, seqused, seg, q4.device)
    if not softcap and slopes is None and dropout_p == 0 and q4.shape[-1] == v4.shape[-1]:
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q4.float(), k4.float(), v4.float(), 0.0, False, attn_mask=_mask_bias(vis), scale=scale)
        o4.copy_(o.to(o4.dtype))
        lse4.copy_(torch.where(vis[:, 0, 0].any(-1)[:, None], l, float("-inf")))  # rows seeing nothing: -inf
        return
    _, p, l = _cpu_probs(q4, k4, None, vis, scale, g, softcap, _slopes_of(slopes, slice(None)), None,
                         shift.reshape(-1, 1, 1, 1, 1))
    if dropout_p > 0:
        p = p * _seq_keep(seed, dropout_p, slice(None), 0, q4, k4, 0, n, 0, m, False, g) / (1 - dropout_p)
    o = torch.einsum("bhgnm,bhmd->bhgnd", p, v4.float())
    o4.copy_(o.flatten(1, 2).to(o4.dtype))
    lse4.copy_(l.flatten(1, 2))


@attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
      window_right, chunk_size, layout, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0,
      key_padding_mask=None, seqused_k=None, segment_ids=None):
    return q.new_empty(_out_shape(q, v)), q.new_empty(_lse_shape(q, layout), dtype=torch.float32)


@attn_fwd.register_kernel("cuda")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
      window_right, chunk_size, layout, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0,
      key_padding_mask=None, seqused_k=None, segment_ids=None):
    return _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     window_left, window_right, chunk_size, layout, softcap, alibi_slopes, dropout_p, seed,
                     key_padding_mask, seqused_k, segment_ids)


@torch.library.custom_op("fasttfm::attn_bwd", mutates_args=(), device_types="cpu")
def attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
             cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
             max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int, chunk_size: int,
             layout: str, softcap: float = 0.0,
             alibi_slopes: Optional[Tensor] = None, dropout_p: float = 0.0, seed: int = 0,
             key_padding_mask: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
             segment_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) shaped like q, k, v (contiguous). dlse: optional gradient of the LSE output."""
    return _bwd_impl(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, window_left, window_right, chunk_size, layout, softcap, alibi_slopes, dropout_p,
                     seed, key_padding_mask, seqused_k, segment_ids)


def _bwd_impl(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, chunk, layout,
              softcap=0.0, slopes=None, dropout_p=0.0, seed=0, kpm=None, seqused=None, seg=None):
    new = torch.zeros if cu_q is not None else torch.empty  # varlen: rows of no sequence get 0
    dq = new(q.shape, dtype=q.dtype, device=q.device)
    dk = new(k.shape, dtype=k.dtype, device=k.device)
    dv = new(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout = _unit_last(dout)
    q4, k4, v4, o4, do4, dq4, dk4, dv4 = (_canon(t, layout) for t in (q, k, v, out, dout, dq, dk, dv))
    if q.is_cuda or emulate_enabled():
        varlen = cu_q is not None
        kw = dict(batch=cu_q.numel() - 1 if varlen else q4.shape[0], seqlen_q=0 if varlen else q4.shape[2],
                  cu_seqlens_q=cu_q, interpret=not q.is_cuda)
        kw2 = dict(kw, seqlen_k=0 if varlen else k4.shape[2], cu_seqlens_k=cu_k, sm_scale=scale,
                   win_left=left, win_right=right, chunk_size=chunk or None, softcap=softcap, alibi_slopes=slopes,
                   dropout_p=dropout_p, seed=seed, **_kernel_masks(kpm, seqused, seg))
        with torch.cuda.device(q.device) if q.is_cuda else _nullctx():
            delta = torch.empty_like(lse)
            _kf.attn_bwd_preprocess(o4, do4, delta, max_seqlen_q=max_q, **kw)
            if dlse is not None:  # d lse_i / d s_ij = p_ij: folds into Delta
                delta = delta - dlse
            _kb.attn_bwd_dkdv(q4, k4, v4, do4, dk4, dv4, lse, delta, max_seqlen_k=max_k, **kw2)
            _kb.attn_bwd_dq(q4, k4, v4, do4, dq4, lse, delta, max_seqlen_q=max_q, **kw2)
        return dq, dk, dv
    lse4 = lse.unsqueeze(0) if layout == "thd" else lse
    dlse4 = None if dlse is None else (dlse.unsqueeze(0) if layout == "thd" else dlse)
    g = q4.shape[1] // k4.shape[1]
    same_d = q4.shape[-1] == v4.shape[-1]  # aten's CPU flash kernel needs one head dim
    if cu_q is None and (kpm is not None or seqused is not None or seg is not None):
        vis, shift = _visible_batched(q4.shape[2], k4.shape[2], left, right, chunk, kpm, seqused, seg, q.device)
        if not softcap and slopes is None and dropout_p == 0 and dlse4 is None and same_d:  # aten's (no LSE grad)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do4.float(), q4.float(), k4.float(), v4.float(), o4.float(),
                torch.where(torch.isinf(lse4), 0.0, lse4).contiguous(), 0.0, False, attn_mask=_mask_bias(vis),
                scale=scale)
            dq4.copy_(gq), dk4.copy_(gk), dv4.copy_(gv)
            return dq, dk, dv
        _cpu_bwd_one(slice(None), 0, (q4, k4, v4, o4, do4, dq4, dk4, dv4), lse4, dlse4, vis, scale, g, softcap,
                     _slopes_of(slopes, slice(None)), dropout_p, seed, (0, q4.shape[2], 0, k4.shape[2]), False,
                     shift.reshape(-1, 1, 1, 1, 1))
        return dq, dk, dv
    for idx, (b, q0, q1, k0, k1) in enumerate(_sequences(cu_q, cu_k, q4, k4, seqused)):
        qs, ks, vs, os_, dos = q4[b, :, q0:q1], k4[b, :, k0:k1], v4[b, :, k0:k1], o4[b, :, q0:q1], do4[b, :, q0:q1]
        causal = _aten_causal(q1 - q0, k1 - k0, left, right, chunk, softcap, slopes, dropout_p)
        if causal is not None and dlse4 is None and same_d:  # aten's backward has no LSE gradient input
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dos.float(), qs.float(), ks.float(), vs.float(), os_.float(), lse4[b, :, q0:q1].contiguous(),
                0.0, causal, scale=scale)
            dq4[b, :, q0:q1], dk4[b, :, k0:k1], dv4[b, :, k0:k1] = gq, gk, gv
            continue
        vis = _visible(q1 - q0, k1 - k0, left, right, chunk, q.device)
        _cpu_bwd_one(b, idx, (q4, k4, v4, o4, do4, dq4, dk4, dv4), lse4, dlse4, vis, scale, g, softcap,
                     _slopes_of(slopes, b, idx if cu_q is not None else None), dropout_p, seed, (q0, q1, k0, k1),
                     cu_q is not None)
    return dq, dk, dv


def _cpu_bwd_one(b, idx, tensors, lse4, dlse4, vis, scale, g, softcap, slopes, dropout_p, seed, span, varlen,
                 shift=None):
    """CPU backward of one problem (batch slice ``b``, rows q0:q1, keys k0:k1 of the canonical views),
    the dense reference math in fp32, written into dq4/dk4/dv4."""
    q4, k4, v4, o4, do4, dq4, dk4, dv4 = tensors
    q0, q1, k0, k1 = span
    qs, ks, vs, os_, dos = q4[b, :, q0:q1], k4[b, :, k0:k1], v4[b, :, k0:k1], o4[b, :, q0:q1], do4[b, :, q0:q1]
    tanh = []
    qg, p, _ = _cpu_probs(qs, ks, lse4[b, :, q0:q1], vis, scale, g, softcap, slopes, tanh, shift)
    bb, hq, n, _ = qs.shape
    dv = vs.shape[-1]
    dog = dos.float().reshape(bb, hq // g, g, n, dv)
    delta = (dog * os_.float().reshape(bb, hq // g, g, n, dv)).sum(-1)
    if dlse4 is not None:
        delta = delta - dlse4[b, :, q0:q1].reshape(bb, hq // g, g, n)
    dp = torch.einsum("bhgnd,bhmd->bhgnm", dog, vs.float())
    if dropout_p > 0:
        z = _seq_keep(seed, dropout_p, b, idx, q4, k4, q0, q1, k0, k1, varlen, g) / (1 - dropout_p)
        dv4[b, :, k0:k1] = torch.einsum("bhgnm,bhgnd->bhmd", p * z, dog).to(dv4.dtype)
        dp = dp * z
    else:
        dv4[b, :, k0:k1] = torch.einsum("bhgnm,bhgnd->bhmd", p, dog).to(dv4.dtype)
    ds = p * (dp - delta[..., None])
    if softcap:
        ds = ds * (1.0 - tanh[0] ** 2)
    dq4[b, :, q0:q1] = (torch.einsum("bhgnm,bhmd->bhgnd", ds, ks.float()) * scale).flatten(1, 2).to(dq4.dtype)
    dk4[b, :, k0:k1] = (torch.einsum("bhgnm,bhgnd->bhmd", ds, qg) * scale).to(dk4.dtype)


@attn_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, chunk_size, layout, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0,
      key_padding_mask=None, seqused_k=None, segment_ids=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@attn_bwd.register_kernel("cuda")
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, chunk_size, layout, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0,
      key_padding_mask=None, seqused_k=None, segment_ids=None):
    return _bwd_impl(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, window_left, window_right, chunk_size, layout, softcap, alibi_slopes, dropout_p,
                     seed, key_padding_mask, seqused_k, segment_ids)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *params = inputs
    softcap = params[7] if len(params) > 7 else 0.0
    slopes = params[8] if len(params) > 8 else None
    masks = [params[i] if len(params) > i else None for i in (11, 12, 13)]  # kpm, seqused_k, segment_ids
    out, lse = output
    ctx.set_materialize_grads(False)  # an unused LSE output leaves dlse None (not a tensor of zeros)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, slopes, *masks)
    ctx.params = (*params[:7], softcap)
    ctx.drop = (params[9] if len(params) > 9 else 0.0, params[10] if len(params) > 10 else 0)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, slopes, kpm, seqused, seg = ctx.saved_tensors
    if dout is None:  # only the LSE was used
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fasttfm.attn_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.params, slopes,
                                            *ctx.drop, kpm, seqused, seg)
    return (dq, dk, dv) + (None,) * 16


attn_fwd.register_autograd(_backward, setup_context=_setup_context)

# Autocast: as F.scaled_dot_product_attention (autocast's lower-precision list), q/k/v go to the
# autocast dtype (alibi slopes stay fp32); inside, autocast is off, so the CPU path's einsums run in the
# fp32 math it asks for. The backward keeps the dtypes the forward saved.
register_lowp_autocast("fasttfm::attn_fwd", (0, 1, 2))
register_autocast("fasttfm::attn_bwd", keep, keep)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- public API ------------------------------------------------------------------------------
def attention(q, k, v, *, causal=False, window=(-1, -1), chunk_size=None, softmax_scale=None, layout="bhnd",
              cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, return_lse=False,
              softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None, return_dropout_mask=False,
              key_padding_mask=None, seqused_k=None, segment_ids=None):
    """Flash attention: softmax(scale * q k^T + mask) v, fused, forward and backward.

    Shapes (``layout``): "bhnd" (B, H, N, D) as SDPA; "bnhd" (B, N, H, D) as flash-attn; with
    ``cu_seqlens_q/k`` (varlen, layout "thd"): q (total_q, Hq, D), k/v (total_k, Hkv, D) packed,
    cu_seqlens int32 (batch + 1,) cumulative lengths, ``max_seqlen_q/k`` the longest sequences
    (computed from cu_seqlens when None: a host sync; pass them under torch.compile / CUDA graphs).
    Any strides with a unit last dim, no copies. Hq % Hkv == 0 (GQA/MQA). Head dims 16..256: q and k
    share one (D), v may have another (Dv, e.g. DeepSeek-V3 MLA's D=192, Dv=128); the output has Dv.
    fp16/bf16 (fp32 statistics); fp32 computed with IEEE fp32 products.

    Masks (FlashAttention's conventions, per sequence, bottom-right aligned when Nq != Nk): query i
    sees key j iff  i + Nk - Nq - left <= j <= i + Nk - Nq + right  (window=(left, right), -1 =
    unbounded; causal sets right = 0), and, with ``chunk_size=C``, floor((i + Nk - Nq) / C) ==
    floor(j / C) (block-diagonal chunks of C key positions). Rows with no visible key give output 0,
    LSE -inf and zero gradients. softmax_scale defaults to D ** -0.5.

    Score modifiers (FlashAttention's order, combinable with every mask and layout): ``softcap=c > 0``
    replaces s = scale * q.k by c * tanh(s / c) (Gemma-2 style; gradient through the tanh);
    ``alibi_slopes`` fp32 (Hq,) or (B, Hq) adds -slope_h * |i + Nk - Nq - j| after the cap (not
    differentiated; varlen: B = number of sequences). The LSE is that of the modified scores.

    Dropout (``dropout_p`` in [0, 1), applied whenever > 0 -- this is the functional form; modules
    pass 0 in eval mode): each probability P_ij is kept with probability 1 - p and scaled by
    1 / (1 - p). The keep bits come from Philox(seed) at counter ((b * Hq + h) * Nq + i) * Nk + j
    (varlen: b = 0 and packed positions), regenerated in the backward (nothing N x N is stored)
    and replicated bit for bit on the CPU path (``philox_keep``). ``seed`` None draws one from
    torch's default CPU generator (so ``torch.manual_seed`` makes runs reproducible; it is a host
    value, so under torch.compile pass an explicit int). ``return_dropout_mask`` (debug, dense
    only) also returns the bool keep mask (B, Hq, Nq, Nk) the kernels used.

    Per-sequence masks (dense layouts "bhnd"/"bnhd"; seqused_k also varlen; combinable with each other and with
    causal/window/chunk/softcap/ALiBi/dropout/GQA), applied inside the kernels, no host sync:
      * ``key_padding_mask`` bool (B, Nk), True = attend (HF's 2-D attention_mask convention; any
        pattern: left/right padding, holes). Keys with False are invisible to every query of that
        batch row; kv tiles before the first / after the last valid key are skipped.
      * ``seqused_k`` int32 (B,), 0 <= seqused_k[b] <= Nk: keys j >= seqused_k[b] are invisible and
        the causal/window/chunk/ALiBi alignment of sequence b is bottom-right relative to
        seqused_k[b] (shift seqused_k[b] - Nq, FlashAttention-3's ``seqused_k``). Also with
        cu_seqlens (varlen, one entry per sequence, <= that sequence's key count).
      * ``segment_ids`` integer (B, N) with Nq == Nk (packed sequences in one row): query i sees key
        j only if both lie in the same maximal run of equal ids along N. Causal/window apply on the
        row's positions (inside a run they equal in-sequence positions).
    Rows that see no key give output 0, LSE -inf and zero gradients.

    Returns out (q's shape and layout with v's head dim; contiguous), and with ``return_lse`` also the fp32
    log-sum-exp of the scaled scores, (B, H, Nq) or (Hq, total_q) for varlen (differentiable).
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if layout not in _LAYOUTS:
        raise ValueError(f"attention: layout must be one of 'bhnd', 'bnhd' (or 'thd' with cu_seqlens), got {layout!r}")
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("attention: varlen needs both cu_seqlens_q and cu_seqlens_k")
        if layout == "bnhd":
            raise ValueError("attention: with cu_seqlens the layout is 'thd' (total, H, D), got layout='bnhd'")
        layout = "thd"
    elif layout == "thd":
        raise ValueError("attention: layout='thd' needs cu_seqlens_q and cu_seqlens_k")
    _check_inputs(q, k, v, layout, varlen)
    _check_window(window)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"attention: chunk_size must be None or a positive int, got {chunk_size!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    if return_dropout_mask and varlen:
        raise ValueError("attention: return_dropout_mask supports dense (non-varlen) inputs only")
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    seed = int(seed or 0)
    if not isinstance(softcap, (int, float)) or softcap < 0 or softcap != softcap:
        raise ValueError(f"attention: softcap must be a float >= 0 (0 = off), got {softcap!r}")
    left, right = window
    right = 0 if causal else right
    left = UNBOUNDED if left < 0 else left
    right = UNBOUNDED if right < 0 else right
    q4, k4 = _canon(q, layout), _canon(k, layout)
    if softmax_scale is None:
        softmax_scale = q4.shape[-1] ** -0.5
    if varlen:
        _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
        _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"attention: cu_seqlens_q and cu_seqlens_k must have the same length, got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    else:
        max_seqlen_q, max_seqlen_k = q4.shape[2], k4.shape[2]
    nk_max = max_seqlen_k if varlen else k4.shape[2]
    _check_masks(key_padding_mask, seqused_k, segment_ids, cu_seqlens_q.numel() - 1 if varlen else q4.shape[0],
                 q4.shape[2], nk_max, q.device, varlen)
    if alibi_slopes is not None:
        nb = cu_seqlens_q.numel() - 1 if varlen else q4.shape[0]
        _check_slopes(alibi_slopes, q4.shape[1], nb, q.device)
        alibi_slopes = alibi_slopes.contiguous()
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out, lse = torch.ops.fasttfm.attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                          int(max_seqlen_k), float(softmax_scale), left, right,
                                          int(chunk_size or 0), layout, float(softcap), alibi_slopes,
                                          float(dropout_p), seed, key_padding_mask, seqused_k, segment_ids)
    res = (out,) + ((lse,) if return_lse else ())
    if return_dropout_mask:
        res += (_dropout_mask_of(q4.shape[0], q4.shape[1], q4.shape[2], k4.shape[2], dropout_p, seed, q.device),)
    return res if len(res) > 1 else out


def _dropout_mask_of(b, hq, nq, nk, p, seed, device):
    if p == 0:
        return torch.ones(b, hq, nq, nk, dtype=torch.bool, device=device)
    if device.type == "cuda" or emulate_enabled():
        with torch.cuda.device(device) if device.type == "cuda" else _nullctx():
            return _kf.dropout_mask(b, hq, nq, nk, dropout_p=p, seed=seed, device=device,
                                    interpret=device.type != "cuda")
    return _keep_mask(seed, p, list(range(b)), hq, 0, nq, 0, nk, nq, nk, False, device)


def _sdpa_key_padding(attn_mask, lead, S, device):
    """The (B, S) bool key padding mask (True = attend) equal to an SDPA boolean ``attn_mask`` that
    broadcasts to (*lead, H, L, S) as a per-key mask -- size 1 along L and H, any batch dims of size 1
    or equal to ``lead`` (e.g. (B, 1, 1, S), (1, 1, 1, S), (1, S)) -- decided from the shape only
    (no value inspection, no host sync); None for any other mask."""
    if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool or attn_mask.device != device:
        return None
    nd = len(lead) + 3
    if not 1 <= attn_mask.dim() <= nd:
        return None
    m = attn_mask.reshape((1,) * (nd - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[-1] not in (1, S) or m.shape[-2] != 1 or m.shape[-3] != 1:
        return None
    if any(a not in (1, b) for a, b in zip(m.shape[:-3], lead)):
        return None
    return m.expand(*lead, 1, 1, S).reshape(-1, S)


def flash_sdpa(q, k, v, *, scale, is_causal=False, dropout_p=0.0, key_padding_mask=None):
    """fasttfm's kernels on (B, H, L, E) / (B, Hkv, S, E) views with SDPA's conventions: top-left
    ``is_causal`` (query i sees keys j <= i, any L and S), a Philox seed drawn from torch's default
    CPU generator when dropout_p > 0, key_padding_mask bool (B, S) True = attend. Returns out (B, H, L, E)."""
    L, S = q.shape[2], k.shape[2]
    # top-left causal: j <= i  <=>  j <= i + (S - L) + right with right = L - S (any sign, inside the op)
    right = (L - S) if is_causal else UNBOUNDED
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    out, _ = torch.ops.fasttfm.attn_fwd(q, k, v, None, None, L, S, float(scale), UNBOUNDED, right, 0, "bhnd", 0.0,
                                        None, float(dropout_p), seed, key_padding_mask, None, None)
    return out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in ``torch.nn.functional.scaled_dot_product_attention`` (same arguments and semantics).

    query (N, ..., Hq, L, E), key/value (N, ..., Hkv, S, E); ``is_causal`` is top-left aligned as
    SDPA defines it (query i sees keys j <= i). With E and Ev in 16..256 (Ev may differ from E; the
    scale defaults to E ** -0.5 as SDPA's) and fp16/bf16/fp32 it runs
    fasttfm's flash kernels when ``attn_mask`` is None or a boolean per-key (padding) mask --
    broadcastable with size 1 along L and H, e.g. (N, 1, 1, S) or (1, 1, 1, S), True = attend,
    detected from its shape only -- which the kernels apply per kv tile (a query row that sees no
    key gives 0, as torch's SDPA does). Any other ``attn_mask`` (float, per-query, per-head) runs
    PyTorch's own SDPA, which is exact for arbitrary masks.
    dropout_p > 0 drops attention probabilities as SDPA does (always, whatever the module mode): in
    the kernels with a Philox seed drawn from torch's default CPU generator (see ``attention``), on
    the fallback path with PyTorch's own dropout.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fasttfm.scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None and is_causal:
        raise RuntimeError("fasttfm.scaled_dot_product_attention: attn_mask and is_causal cannot both be set")
    hq, hkv = query.shape[-3] if query.dim() >= 3 else 1, key.shape[-3] if key.dim() >= 3 else 1
    if hq != hkv and not enable_gqa:
        raise RuntimeError(f"fasttfm.scaled_dot_product_attention: query has {hq} heads and key/value {hkv}; "
                           f"pass enable_gqa=True for grouped-query attention")
    e = query.shape[-1]
    fast = (query.dim() >= 3 and query.dim() == key.dim() == value.dim()
            and key.shape[-1] == e and 16 <= e <= 256 and 16 <= value.shape[-1] <= 256
            and query.dtype in _DTYPES and key.dtype in _DTYPES and value.dtype in _DTYPES
            and autocast_dtype(query) == autocast_dtype(key) == autocast_dtype(value)
            and (hkv > 0 and hq % hkv == 0))
    kpm = None
    if fast and attn_mask is not None:
        kpm = _sdpa_key_padding(attn_mask, query.shape[:-3], key.shape[-2], query.device)
        fast = kpm is not None
    if not fast:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa)
    lead = query.shape[:-3]
    q, k, v = (t.reshape(-1, *t.shape[-3:]) if t.dim() != 4 else t for t in (query, key, value))
    if q.shape[0] != k.shape[0]:
        k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
    if kpm is not None and kpm.shape[0] != q.shape[0]:  # a 3-D query: one batch row
        kpm = kpm.expand(q.shape[0], -1)
    out = flash_sdpa(q, k, v, scale=e ** -0.5 if scale is None else scale, is_causal=is_causal, dropout_p=dropout_p,
                     key_padding_mask=kpm)
    return out.reshape(*lead, *out.shape[-3:]) if len(lead) != 1 else out

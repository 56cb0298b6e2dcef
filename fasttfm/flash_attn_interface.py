"""flash-attn 2.8's public functions on fasttfm's kernels: switching is one import line.

    from fasttfm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    # or: from fasttfm.flash_attn import ...; padding helpers in fasttfm.bert_padding

Same names, positional order, defaults, shapes and return values as flash-attn 2.8
(``flash_attn/flash_attn_interface.py``); the work is done by ``fasttfm.attention`` (training,
differentiable) and ``fasttfm.attention_with_kvcache`` (decode). Differences, all deliberate:

- dtypes: fp16/bf16 as flash-attn, and fp32 too (flash-attn refuses it). Head dims 1..256; dims
  below 16 are zero-padded to 16 (as flash-attn pads to a multiple of 8) except in
  ``flash_attn_with_kvcache``, which needs 16..256 (the cache is not copied). v's head dim may
  differ from q/k's (FlashAttention-3 allows it, e.g. DeepSeek-V3's 192/128); out has v's.
- dropout: the same distribution (keep with 1 - p, scale 1 / (1 - p)) from fasttfm's Philox
  stream, not flash-attn's bits; the seed is drawn from torch's default CPU generator.
- ``deterministic``: accepted; fasttfm's backward is always deterministic (no atomics).
- ``return_attn_probs=True``: (out, softmax_lse, S_dmask) as flash-attn; S_dmask is None when
  dropout_p == 0 (as flash-attn). With dropout it is the (B, H, Sq, Sk) softmax probabilities
  (normalized, fp32, recomputed densely: test-sized problems only) with the sign bit set where
  the kernel dropped the entry -- flash-attn documents its values as "possibly with different
  scaling" and pads the sizes to multiples of 128; the dropout pattern (``~S.signbit()``) is
  exactly the kernels' keep mask.
- ``softmax_lse`` carries no gradient (flash-attn's backward ignores it too); rows that see no key
  get +inf as in flash-attn (fasttfm.attention itself reports -inf there).
- ``flash_attn_varlen_func(block_table=...)`` (paged prefill): the used pages are gathered into
  packed K/V by a torch pre-op (one copy), then the varlen kernels run; page size any multiple of
  16 (flash-attn: 256); differentiable (flash-attn's paged varlen is forward-only). The decode
  kernel of ``flash_attn_with_kvcache`` reads pages in place.
"""
import torch
from torch import Tensor

from fasttfm.ops import attention as _A
from fasttfm.ops.attention import attention
from fasttfm.ops.attention_decode import attention_with_kvcache

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]

_MIN_D = 16


# -- argument normalization (flash-attn's rules) ----------------------------------------------
def _window(fn, window_size):
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or \
            not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size):
        raise ValueError(f"{fn}: window_size must be a pair (left, right) of ints (negative = unbounded), "
                         f"got {window_size!r}")
    return tuple(-1 if w < 0 else w for w in window_size)  # flash-attn: any negative side = no limit


def _common(fn, dropout_p, softcap, deterministic, return_attn_probs, causal):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap != softcap:
        raise ValueError(f"{fn}: softcap must be a float (> 0 turns softcapping on), got {softcap!r}")
    for name, val in (("deterministic", deterministic), ("return_attn_probs", return_attn_probs),
                      ("causal", causal)):
        if not isinstance(val, bool):
            raise ValueError(f"{fn}: {name} must be a bool, got {val!r}")
    return float(softcap) if softcap > 0 else 0.0  # flash-attn: softcap <= 0 = off


def _fa_lse(lse):
    """flash-attn's LSE convention: +inf (not -inf) for rows with no visible key; no gradient."""
    lse = lse.detach()
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _pad_d(ts, d):
    """Zero-pad the head dim to 16 when below (a zero column changes no dot product)."""
    if d >= _MIN_D:
        return ts
    return [torch.nn.functional.pad(t, (0, _MIN_D - d)) for t in ts]


def _check_tensor(fn, name, t, dims):
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{fn}: {name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.shape[-1] > 256 or t.shape[-1] < 1:
        raise ValueError(f"{fn}: head dim must be in 1..256, got {t.shape[-1]}")


def _run(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
         return_attn_probs, cu_q=None, cu_k=None, max_q=None, max_k=None):
    softcap = _common(fn, dropout_p, softcap, deterministic, return_attn_probs, causal)
    window = _window(fn, window_size)
    varlen = cu_q is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(fn, name, t, 3 if varlen else 4)
    d = q.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else None
    dv = v.shape[-1]  # may differ from q/k's d (DeepSeek-style MLA); the output has dv
    qp, kp = _pad_d([q, k], d)
    (vp,) = _pad_d([v], dv)
    kw = dict(causal=causal, window=window, softmax_scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
              dropout_p=float(dropout_p), seed=seed, return_lse=True)
    if varlen:
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, layout="thd")
    else:
        kw.update(layout="bnhd")
    out, lse = attention(qp, kp, vp, **kw)
    out = out[..., :dv] if dv < _MIN_D else out
    if not return_attn_probs:
        return out
    s_dmask = None
    if dropout_p > 0:
        with torch.no_grad():
            s_dmask = _s_dmask(q, k, scale, causal, window, softcap, alibi_slopes, float(dropout_p), seed,
                               cu_q, cu_k, max_q, max_k)
    return out, _fa_lse(lse), s_dmask


def _s_dmask(q, k, scale, causal, window, softcap, slopes, p, seed, cu_q, cu_k, max_q, max_k):
    """(B, Hq, Sq, Sk) fp32 probabilities, sign bit set where the kernels dropped the entry."""
    left, right = window
    right = 0 if causal else right
    left = _A.UNBOUNDED if left < 0 else left
    right = _A.UNBOUNDED if right < 0 else right
    hq, hkv = q.shape[-2], k.shape[-2]
    g = hq // hkv
    if cu_q is None:
        b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
        q4, k4 = q.transpose(1, 2), k.transpose(1, 2)
        vis = _A._visible(nq, nk, left, right, 0, q.device)
        _, prob, _ = _A._cpu_probs(q4, k4, None, vis, scale, g, softcap, _A._slopes_of(slopes, slice(None)))
        keep = _A._keep_mask(seed, p, list(range(b)), hq, 0, nq, 0, nk, nq, nk, False, q.device)
        prob = prob.reshape(b, hq, nq, nk)
        return torch.where(keep, prob, -prob)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    nb = len(cq) - 1
    max_q = max_q if max_q is not None else max(b - a for a, b in zip(cq, cq[1:]))
    max_k = max_k if max_k is not None else max(b - a for a, b in zip(ck, ck[1:]))
    res = torch.zeros(nb, hq, max_q, max_k, dtype=torch.float32, device=q.device)
    for i in range(nb):
        q0, q1, k0, k1 = cq[i], cq[i + 1], ck[i], ck[i + 1]
        n, m = q1 - q0, k1 - k0
        if n == 0 or m == 0:
            continue
        q4, k4 = q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None]
        vis = _A._visible(n, m, left, right, 0, q.device)
        _, prob, _ = _A._cpu_probs(q4, k4, None, vis, scale, g, softcap, _A._slopes_of(slopes, None, i))
        keep = _A._keep_mask(seed, p, [0], hq, q0, n, k0, m, q.shape[0], k.shape[0], True, q.device)
        prob = prob.reshape(1, hq, n, m)
        res[i:i + 1, :, :n, :m] = torch.where(keep, prob, -prob)
    return res


# -- dense -----------------------------------------------------------------------------------------
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), Hq % Hkv == 0 (MQA/GQA). Causal and the window
    are aligned bottom-right: query i sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right
    (-1 = unbounded; causal sets right = 0); rows seeing no key give 0. softcap > 0: s = c tanh(s / c);
    alibi_slopes fp32 (Hq,) or (B, Hq): bias -slope |i + Sk - Sq - j|. Returns out (B, Sq, Hq, D),
    or with return_attn_probs (out, softmax_lse (B, Hq, Sq) fp32, S_dmask or None). Differentiable."""
    return _run("flash_attn_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func`` with kv (B, Sk, 2, Hkv, D) stacked (no copy: k/v are views)."""
    fn = "flash_attn_kvpacked_func"
    _check_tensor(fn, "kv", kv, 5)
    if kv.shape[2] != 2:
        raise ValueError(f"{fn}: kv must be (B, Sk, 2, Hkv, D), got shape {tuple(kv.shape)}")
    return _run(fn, q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func`` with qkv (B, S, 3, H, D) stacked (no copy: q/k/v are views)."""
    fn = "flash_attn_qkvpacked_func"
    _check_tensor(fn, "qkv", qkv, 5)
    if qkv.shape[2] != 3:
        raise ValueError(f"{fn}: qkv must be (B, S, 3, H, D), got shape {tuple(qkv.shape)}")
    return _run(fn, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                softcap, alibi_slopes, deterministic, return_attn_probs)


# -- varlen ------------------------------------------------------------------------------------------
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens_q/k int32 (B + 1,),
    max_seqlen_q/k ints. Masks per sequence as ``flash_attn_func``; alibi_slopes (Hq,) or (B, Hq).
    Returns out (total_q, Hq, D), or (out, softmax_lse (Hq, total_q), S_dmask (B, Hq, max_q, max_k)
    or None). block_table int32 (B, P): k/v are pages (num_pages, page_size, Hkv, D), page_size a
    multiple of 16; sequence b's key t is row t % page_size of page block_table[b, t // page_size]
    (t < cu_seqlens_k[b + 1] - cu_seqlens_k[b]); the pages are gathered into packed K/V first."""
    fn = "flash_attn_varlen_func"
    if block_table is not None:
        k, v = _gather_pages(fn, k, v, block_table, cu_seqlens_k)
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{fn}: {name} must be an int >= 0, got {val!r}")
    return _run(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                return_attn_probs, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def _gather_pages(fn, k, v, block_table, cu_k):
    """Packed (total_k, Hkv, D) K and (total_k, Hkv, Dv) V of a paged cache: the keys of each sequence
    from its pages (v's head dim Dv may differ from k's)."""
    for name, t in (("k", k), ("v", v)):
        _check_tensor(fn, name, t, 4)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{fn}: with block_table, k and v must be pages (num_pages, page_size, Hkv, D / Dv) of one "
                         f"shape but the head dim, got {tuple(k.shape)} and {tuple(v.shape)}")
    ps = k.shape[1]
    if ps % 16 or ps == 0:
        raise ValueError(f"{fn}: page size (k.shape[1]) must be a positive multiple of 16, got {ps}")
    if not isinstance(cu_k, Tensor) or cu_k.dim() != 1:
        raise ValueError(f"{fn}: cu_seqlens_k must be a 1-D torch.int32 tensor")
    nb = cu_k.numel() - 1
    if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 or \
            block_table.shape[0] != nb or block_table.device != k.device:
        desc = f"{block_table.dtype} tensor of shape {tuple(block_table.shape)}" if isinstance(block_table, Tensor) \
            else type(block_table).__name__
        raise ValueError(f"{fn}: block_table must be a torch.int32 tensor of shape ({nb}, pages per sequence) on "
                         f"{k.device}, got {desc}")
    lens = (cu_k[1:] - cu_k[:-1]).long()
    if nb and int(lens.max()) > block_table.shape[1] * ps:
        raise ValueError(f"{fn}: a sequence of {int(lens.max())} keys does not fit its block_table row of "
                         f"{block_table.shape[1]} pages of {ps}")
    seq = torch.repeat_interleave(torch.arange(nb, device=k.device), lens)
    pos = torch.arange(seq.numel(), device=k.device) - cu_k.long()[seq]
    pages = block_table.long()[seq, torch.div(pos, ps, rounding_mode="floor")]
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= k.shape[0]):
        raise ValueError(f"{fn}: block_table holds page indices outside 0..{k.shape[0] - 1} (k.shape[0] pages)")
    rows = pos % ps
    return k[pages, rows], v[pages, rows]


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_varlen_func`` with kv (total_k, 2, Hkv, D) stacked."""
    fn = "flash_attn_varlen_kvpacked_func"
    _check_tensor(fn, "kv", kv, 4)
    if kv.shape[1] != 2:
        raise ValueError(f"{fn}: kv must be (total_k, 2, Hkv, D), got shape {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``flash_attn_varlen_func`` with qkv (total, 3, H, D) stacked and one cu_seqlens / max_seqlen."""
    fn = "flash_attn_varlen_qkvpacked_func"
    _check_tensor(fn, "qkv", qkv, 4)
    if qkv.shape[1] != 3:
        raise ValueError(f"{fn}: qkv must be (total, 3, H, D), got shape {tuple(qkv.shape)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


# -- decode ------------------------------------------------------------------------------------------
def apply_rotary(x, cos, sin, positions, interleaved):
    """Rotary embedding of x (B, S, H, D) at integer ``positions`` (B, S): the first
    rotary_dim = 2 * cos.shape[1] dims rotate by angle pairs cos/sin[positions] (fp32 math, result in
    x's dtype), the rest pass through. interleaved: pairs (0, 1), (2, 3), ... (GPT-J); else
    (i, i + rotary_dim / 2) (GPT-NeoX). Out-of-place."""
    rd = 2 * cos.shape[1]
    c = cos.float()[positions][:, :, None, :]  # (B, S, 1, rd / 2)
    s_ = sin.float()[positions][:, :, None, :]
    xr = x[..., :rd].float()
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :rd // 2], xr[..., rd // 2:])
    y1, y2 = x1 * c - x2 * s_, x1 * s_ + x2 * c
    y = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((y.to(x.dtype), x[..., rd:]), -1)


def _check_rotary(fn, rotary_cos, rotary_sin, q, k, capacity):
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{fn}: pass both rotary_cos and rotary_sin, or neither")
    if k is None:
        raise ValueError(f"{fn}: rotary_cos/rotary_sin need the new k and v (the rotation applies to appended keys)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype != q.dtype or t.device != q.device:
            desc = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a 2-D (seqlen_ro, rotary_dim / 2) tensor of q's dtype on "
                             f"{q.device}, got {desc}")
    if rotary_cos.shape != rotary_sin.shape:
        raise ValueError(f"{fn}: rotary_cos and rotary_sin must have the same shape, got {tuple(rotary_cos.shape)} "
                         f"and {tuple(rotary_sin.shape)}")
    rd = 2 * rotary_cos.shape[1]
    if rd > q.shape[-1] or rd % 16:
        raise ValueError(f"{fn}: rotary_dim = 2 * rotary_cos.shape[1] must be a multiple of 16 and <= head dim "
                         f"{q.shape[-1]}, got {rd}")
    if rotary_cos.shape[0] < capacity:
        raise ValueError(f"{fn}: rotary_cos/rotary_sin need at least as many rows ({rotary_cos.shape[0]}) as the "
                         f"cache has positions ({capacity})")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Decode step over a KV cache (flash-attn 2.8's signature): k/v, if given, are rotated (with
    rotary_cos/sin) and written into k_cache/v_cache *in place* at positions cache_seqlens[b] ..;
    then q (rotated likewise) attends over the valid keys. Inference only (no autograd, as flash-attn).

    q (B, Sq, Hq, D); k_cache/v_cache (B_cache, S_max, Hkv, D), or with block_table int32 (B, P) a paged
    cache (num_pages, page_size, Hkv, D), page_size a multiple of 16 (flash-attn: of 256); k/v
    (B, Snew, Hkv, D). cache_seqlens int or int32 (B,) (None: the whole cache is valid, no k/v);
    cache_batch_idx int32 (B,) cache rows; cache_leftpad int32 (B,) first valid cache position.
    Rotary: cos/sin (seqlen_ro >= S_max, rotary_dim / 2); keys at positions cache_seqlens - leftpad
    + i; queries at the same positions when causal or local, else all at cache_seqlens - leftpad.
    Masks, softcap, ALiBi as flash_attn_func, with Sk = cache_seqlens + Snew - leftpad keys.
    num_splits: 0 heuristic, else KV splits. Returns out (B, Sq, Hq, D) [, softmax_lse (B, Hq, Sq),
    +inf for rows that see no key].
    Head dim 16..256 here (no padding of the cache)."""
    fn = "flash_attn_with_kvcache"
    softcap = _common(fn, 0.0, softcap, False, bool(return_softmax_lse), causal)
    window = _window(fn, window_size)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(fn, name, t, 4)
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v, or neither")
    if not isinstance(rotary_interleaved, bool):
        raise ValueError(f"{fn}: rotary_interleaved must be a bool, got {rotary_interleaved!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"{fn}: num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    b = q.shape[0]
    capacity = k_cache.shape[1] * (block_table.shape[1] if isinstance(block_table, Tensor) else 1)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{fn}: k/v need cache_seqlens (where to append them)")
        cache_seqlens = torch.full((b,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    with torch.no_grad():  # flash-attn's kvcache op is outside autograd
        if rotary_cos is not None or rotary_sin is not None:
            _check_rotary(fn, rotary_cos, rotary_sin, q, k, capacity)
            base = cache_seqlens.long() if cache_leftpad is None else cache_seqlens.long() - cache_leftpad.long()
            kpos = base[:, None] + torch.arange(k.shape[1], device=q.device)[None, :]
            local = causal or any(0 <= w < capacity for w in window)  # flash-attn: sides >= S_max are unbounded
            qpos = base[:, None] + (torch.arange(q.shape[1], device=q.device)[None, :] if local else 0)
            qpos = qpos.expand(b, q.shape[1])
            k = apply_rotary(k, rotary_cos, rotary_sin, kpos, rotary_interleaved)
            q = apply_rotary(q, rotary_cos, rotary_sin, qpos, rotary_interleaved)
        res = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, causal=causal, window=window,
                                     softmax_scale=softmax_scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                     num_splits=num_splits, return_lse=bool(return_softmax_lse),
                                     cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                                     block_table=block_table)
    return (res[0], _fa_lse(res[1])) if return_softmax_lse else res

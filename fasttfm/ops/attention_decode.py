"""KV-cache decoding: ``attention_with_kvcache`` and its custom op ``fasttfm::attn_decode``.

Inference only. The op *writes into* ``k_cache``/``v_cache`` (declared with ``mutates_args`` so
torch.compile and functionalization see the mutation): it appends k_new/v_new at positions
cache_seqlens[b] .. cache_seqlens[b] + Snew - 1, then attends over the valid prefix. Writing into
a tensor autograd still needs would silently corrupt a backward pass, so the public function
refuses to run when grad mode is on and any input requires grad (use ``torch.no_grad()`` or
``torch.inference_mode()``, as generation loops do).

Device dispatch as ``fasttfm/ops/attention.py``: CUDA tensors run ``kernels/attention_decode.py``
(split-K partials + a combine kernel); CPU tensors a plain PyTorch path in fp32 math, or under
``fasttfm.emulate()`` / ``FASTTFM_EMULATE=1`` the same Triton kernels through the interpreter.
The append itself is a PyTorch ``index_put_`` on both paths (one memory-bound copy of the new
rows; no host sync).
"""
from typing import Optional

import torch
from torch import Tensor

from fasttfm._env import emulate_enabled
from fasttfm.kernels import attention_decode as _kd

from ._attention_masks import key_bounds
from ._autocast import keep, register_autocast

__all__ = ["attention_with_kvcache"]

UNBOUNDED = 1 << 30
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows(k_cache, b, pos, cache_batch_idx, block_table):
    """(cache row, position within it) index tensors of cache positions ``pos`` (B, n) of each batch
    entry: paged caches through the block table, else row cache_batch_idx[b] (or b)."""
    if block_table is not None:
        ps = k_cache.shape[1]
        return block_table.long().gather(1, torch.div(pos, ps, rounding_mode="floor")), pos % ps
    rows = torch.arange(b, device=k_cache.device) if cache_batch_idx is None else cache_batch_idx.long()
    return rows[:, None].expand_as(pos), pos


def _append_(k_cache, v_cache, cache_seqlens, k_new, v_new, cache_batch_idx=None, block_table=None):
    if k_new is None or k_new.shape[1] == 0:
        return
    b, n = k_new.shape[0], k_new.shape[1]
    pos = cache_seqlens.long()[:, None] + torch.arange(n, device=k_cache.device)[None, :]
    idx = _rows(k_cache, b, pos, cache_batch_idx, block_table)
    k_cache.index_put_(idx, k_new)
    v_cache.index_put_(idx, v_new)


@torch.library.custom_op("fasttfm::attn_decode", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def attn_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Optional[Tensor],
                v_new: Optional[Tensor], softmax_scale: float, window_left: int, window_right: int,
                softcap: float, alibi_slopes: Optional[Tensor], num_splits: int,
                cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                block_table: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor]:
    """(out (B, Sq, Hq, D), lse (B, Hq, Sq) fp32); appends k_new/v_new into the caches in place.
    Window sides UNBOUNDED (2**30) for no limit; softcap 0 = off; num_splits 0 = heuristic.
    cache_batch_idx / cache_leftpad int32 (B,), block_table int32 (B, pages), key_padding_mask bool
    (B, S_max): see attention_with_kvcache."""
    return _decode_impl(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, window_left,
                        window_right, softcap, alibi_slopes, num_splits, cache_batch_idx, cache_leftpad, block_table,
                        key_padding_mask)


def _decode_impl(q, k_cache, v_cache, seqlens, k_new, v_new, scale, left, right, softcap, slopes, num_splits,
                 cache_batch_idx=None, cache_leftpad=None, block_table=None, key_padding_mask=None):
    _append_(k_cache, v_cache, seqlens, k_new, v_new, cache_batch_idx, block_table)
    n_new = 0 if k_new is None else k_new.shape[1]
    total = (seqlens + n_new).to(torch.int32)
    b, sq, hq, d = q.shape
    dv = v_cache.shape[-1]
    out = torch.empty((b, sq, hq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    if q.is_cuda or emulate_enabled():
        with torch.cuda.device(q.device) if q.is_cuda else _nullctx():
            _kd.attn_decode(q, k_cache, v_cache, total, out, lse, softmax_scale=scale, win_left=left,
                            win_right=right, softcap=softcap, alibi_slopes=slopes, num_splits=num_splits or None,
                            interpret=not q.is_cuda, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                            block_table=block_table,
                            key_mask=None if key_padding_mask is None else key_padding_mask.view(torch.uint8),
                            key_bounds=None if key_padding_mask is None else key_bounds(key_padding_mask))
        return out, lse
    hkv = k_cache.shape[2]
    g = hq // hkv
    pads = [0] * b if cache_leftpad is None else cache_leftpad.tolist()
    for i, end in enumerate(total.tolist()):
        pos = torch.arange(pads[i], max(end, pads[i]), device=q.device)[None]  # valid cache positions
        row = torch.tensor([i], device=q.device) if cache_batch_idx is None else cache_batch_idx[i:i + 1]
        rows, offs = _rows(k_cache, 1, pos, row, None if block_table is None else block_table[i:i + 1])
        n = pos.shape[1]
        kk = k_cache[rows[0], offs[0]].float().transpose(0, 1)  # (Hkv, n, D)
        vv = v_cache[rows[0], offs[0]].float().transpose(0, 1)
        keep = None if key_padding_mask is None else key_padding_mask[i, pos[0]]
        if keep is not None:  # masked rows may hold NaN: never let them into the products
            kk, vv = kk.masked_fill(~keep[None, :, None], 0.0), vv.masked_fill(~keep[None, :, None], 0.0)
        qq = q[i].float().transpose(0, 1).reshape(hkv, g, sq, d)
        s = torch.einsum("hgqd,hkd->hgqk", qq, kk) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        p_ = torch.arange(sq, device=q.device)[:, None] + (n - sq)
        j = torch.arange(n, device=q.device)[None, :]
        if slopes is not None:
            sl = (slopes[i] if slopes.dim() == 2 else slopes).float().reshape(hkv, g, 1, 1)
            s = s - sl * (p_ - j).abs()
        vis = (j >= p_ - left) & (j <= p_ + right)
        if keep is not None:
            vis = vis & keep[None, :]
        s = s.masked_fill(~vis, float("-inf"))
        l_ = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(l_), 0.0, l_)[..., None])
        o = torch.einsum("hgqk,hkd->hgqd", p, vv).reshape(hq, sq, dv)
        out[i] = o.transpose(0, 1).to(q.dtype)
        lse[i] = l_.reshape(hq, sq)
    return out, lse


@attn_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, window_left, window_right, softcap,
      alibi_slopes, num_splits, cache_batch_idx=None, cache_leftpad=None, block_table=None, key_padding_mask=None):
    b, sq, hq, _ = q.shape
    return q.new_empty((b, sq, hq, v_cache.shape[-1])), q.new_empty((b, hq, sq), dtype=torch.float32)


@attn_decode.register_kernel("cuda")
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, window_left, window_right, softcap,
      alibi_slopes, num_splits, cache_batch_idx=None, cache_leftpad=None, block_table=None, key_padding_mask=None):
    return _decode_impl(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, window_left,
                        window_right, softcap, alibi_slopes, num_splits, cache_batch_idx, cache_leftpad, block_table,
                        key_padding_mask)


# Autocast: no cast (the op writes into the caches, which must keep their dtype, and q/k_new/v_new
# must already share it); autocast is off inside, so the CPU path keeps its fp32 math.
register_autocast("fasttfm::attn_decode", keep, keep)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _err(msg):
    return ValueError(f"attention_with_kvcache: {msg}")


def _check_indices(seqlens, n_new, n_rows, page_size, cache_batch_idx, cache_leftpad, block_table):
    """Host-side range checks of the index tensors (one sync on CUDA)."""
    if cache_batch_idx is not None and cache_batch_idx.numel():
        lo, hi = int(cache_batch_idx.min()), int(cache_batch_idx.max())
        if lo < 0 or hi >= n_rows:
            raise _err(f"cache_batch_idx out of range: need 0 <= idx < {n_rows} (k_cache.shape[0]), got min {lo}, "
                       f"max {hi}")
    if cache_leftpad is not None and ((cache_leftpad < 0) | (cache_leftpad > seqlens)).any():
        raise _err(f"cache_leftpad out of range: need 0 <= cache_leftpad <= cache_seqlens, got "
                   f"{cache_leftpad.tolist()} with cache_seqlens {seqlens.tolist()}")
    if block_table is not None and block_table.numel():
        used = torch.arange(block_table.shape[1], device=block_table.device)[None, :]
        need = torch.div(seqlens.long() + n_new + page_size - 1, page_size, rounding_mode="floor")[:, None]
        bad = (used < need) & ((block_table < 0) | (block_table >= n_rows))
        if bad.any():
            b_, j = (int(x) for x in bad.nonzero()[0])
            raise _err(f"block_table[{b_}, {j}] = {int(block_table[b_, j])} is not a page of the cache "
                       f"(need 0 <= page < {n_rows} = k_cache.shape[0])")


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *, causal=False,
                           window=(-1, -1), softmax_scale=None, softcap=0.0, alibi_slopes=None, num_splits=0,
                           check_seqlens=True, return_lse=False, cache_batch_idx=None, cache_leftpad=None,
                           block_table=None, key_padding_mask=None):
    """Decode step (flash-attn's ``flash_attn_with_kvcache``): append, then attend over the cache.

    q (B, Sq, Hq, D) -- usually Sq = 1; k_cache (B, S_max, Hkv, D) and v_cache (B, S_max, Hkv, Dv)
    preallocated (Dv may differ from D, as DeepSeek's MLA 192/128; out is (B, Sq, Hq, Dv)), any strides
    with a unit last dim, Hq % Hkv == 0 (GQA/MQA); cache_seqlens int32 (B,) valid lengths *before*
    this call; k_new (B, Snew, Hkv, D) / v_new (B, Snew, Hkv, Dv) or None, written in place at positions
    cache_seqlens[b] .. + Snew - 1 (the caller advances cache_seqlens by Snew afterwards). Query i
    sees key j of the L_b = cache_seqlens[b] + Snew valid keys iff
    i + L_b - Sq - left <= j <= i + L_b - Sq + right (window=(left, right), -1 unbounded; causal sets
    right = 0: the new tokens attend causally to each other). softcap / alibi_slopes as in
    ``fasttfm.attention``. num_splits: kv splits (0 = heuristic from the SM count and cache size).

    Inference only: raises when grad mode is on and an input requires grad (the caches are written
    in place). check_seqlens: validate 0 <= cache_seqlens and cache_seqlens + Snew <= S_max on the
    host (one sync on CUDA; pass False inside CUDA graphs / torch.compile after validating once).
    Returns out (B, Sq, Hq, D), and with return_lse the fp32 LSE (B, Hq, Sq).

    cache_batch_idx int32 (B,): batch entry b uses cache row cache_batch_idx[b] (k_cache may then hold
    more rows than B). cache_leftpad int32 (B,): batch entry b's keys are cache positions
    cache_leftpad[b] .. L_b - 1 (left-padded caches; masks and ALiBi count keys from there).
    block_table int32 (B, P): a paged cache, k_cache/v_cache (num_pages, page_size, Hkv, D) with
    page_size a multiple of 16; cache position t of batch b is row t % page_size of page
    block_table[b, t // page_size] (appends go there too); S_max = P * page_size. check_seqlens also
    checks cache_leftpad (0 <= leftpad <= cache_seqlens), cache_batch_idx and the block table entries
    in use (0 <= page < num_pages).

    key_padding_mask bool (B, S_max), True = attend (HF's 2-D attention mask over the cache): batch
    entry b never sees a key at cache position t with key_padding_mask[b, t] False (any pattern; the
    new tokens' positions included). It only removes keys: positions, windows and ALiBi distances are
    unchanged. Fully masked leading/trailing kv tiles are skipped (bounds computed on the device); a
    query that sees no key gives 0 (LSE -inf).
    """
    tensors = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    if (k_new is None) != (v_new is None):
        raise _err("pass both k_new and v_new, or neither")
    if k_new is not None:
        tensors += [("k_new", k_new), ("v_new", v_new)]
    for name, t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"attention_with_kvcache: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise _err(f"{name} must be 4-D (B, S, H, D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES or t.dtype != q.dtype:
            raise TypeError(f"attention_with_kvcache: {name}.dtype must be q's dtype (float16, bfloat16 or "
                            f"float32), got {t.dtype} (q: {q.dtype})")
        if t.device != q.device:
            raise _err(f"all tensors must be on {q.device}, {name} is on {t.device}")
        if t.stride(-1) != 1:
            raise _err(f"{name} must have a unit last-dim stride")
    if torch.is_grad_enabled() and any(t.requires_grad for _, t in tensors):
        raise RuntimeError("attention_with_kvcache is inference-only (it writes into k_cache/v_cache in place, "
                           "which autograd may still need): call it under torch.no_grad() or torch.inference_mode()")
    b, sq, hq, d = q.shape
    bc, s_max, hkv, dc = k_cache.shape
    dv = v_cache.shape[-1]
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise _err(f"k_cache and v_cache must agree in all but the head dim (B, S_max, Hkv), got "
                   f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if t is not None and (not isinstance(t, Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (b,)
                              or t.device != q.device):
            desc = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise _err(f"{name} must be a torch.int32 tensor of shape ({b},) on {q.device}, got {desc}")
    if block_table is not None:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 or \
                block_table.shape[0] != b or block_table.device != q.device:
            desc = f"{block_table.dtype} tensor of shape {tuple(block_table.shape)}" \
                if isinstance(block_table, Tensor) else type(block_table).__name__
            raise _err(f"block_table must be a torch.int32 tensor of shape ({b}, pages per sequence) on {q.device}, "
                       f"got {desc}")
        if cache_batch_idx is not None:
            raise _err("cache_batch_idx cannot be combined with block_table (the block table already maps "
                       "each batch entry to its pages)")
        if s_max % 16 or s_max == 0:
            raise _err(f"paged cache: page size (k_cache.shape[1]) must be a positive multiple of 16, got {s_max}")
        s_max = block_table.shape[1] * s_max
    elif cache_batch_idx is None and bc != b:
        raise _err(f"k_cache must be (B={b}, S_max, Hkv, D={d}), got {tuple(k_cache.shape)}")
    if dc != d:
        raise _err(f"k_cache must be (B={b}, S_max, Hkv, D={d}), got {tuple(k_cache.shape)}")
    if not 16 <= d <= 256 or not 16 <= dv <= 256:
        raise _err(f"head dims must be in 16..256, got {d} (q/k) and {dv} (v)")
    if hkv == 0 or hq % hkv:
        raise _err(f"number of q heads ({hq}) must be a multiple of the number of k/v heads ({hkv})")
    n_new = 0
    if k_new is not None:
        if k_new.shape[:3] != v_new.shape[:3] or k_new.shape[0] != b or k_new.shape[2:] != (hkv, d) or \
                v_new.shape[3] != dv:
            raise _err(f"k_new/v_new must be (B={b}, Snew, Hkv={hkv}, D={d}) and (B={b}, Snew, Hkv={hkv}, Dv={dv}), "
                       f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        n_new = k_new.shape[1]
        if n_new > s_max:
            raise _err(f"cache too small: {n_new} new tokens do not fit a cache of {s_max} positions")
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32 or \
            tuple(cache_seqlens.shape) != (b,):
        desc = f"{cache_seqlens.dtype} tensor of shape {tuple(cache_seqlens.shape)}" \
            if isinstance(cache_seqlens, Tensor) else type(cache_seqlens).__name__
        raise _err(f"cache_seqlens must be a torch.int32 tensor of shape ({b},), got {desc}")
    if cache_seqlens.device != q.device:
        raise _err(f"cache_seqlens must be on {q.device}, got {cache_seqlens.device}")
    if check_seqlens and not torch.compiler.is_compiling():
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi + n_new > s_max:
            raise _err(f"cache_seqlens out of range: need 0 <= cache_seqlens and cache_seqlens + {n_new} new "
                       f"<= cache size {s_max}, got min {lo}, max {hi}"
                       + (" (cache too small)" if hi + n_new > s_max else ""))
    if check_seqlens and not torch.compiler.is_compiling():
        _check_indices(cache_seqlens, n_new, bc, k_cache.shape[1], cache_batch_idx, cache_leftpad, block_table)
    if key_padding_mask is not None and (not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype !=
                                         torch.bool or tuple(key_padding_mask.shape) != (b, s_max)
                                         or key_padding_mask.device != q.device):
        desc = f"{key_padding_mask.dtype} tensor of shape {tuple(key_padding_mask.shape)} on {key_padding_mask.device}" \
            if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
        raise _err(f"key_padding_mask must be a torch.bool tensor of shape (B={b}, S_max={s_max}) on {q.device} "
                   f"(True = attend), got {desc}")
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()
    ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) and w >= -1 for w in window)
    if not ok:
        raise _err(f"window must be a pair (left, right) of ints >= -1 (-1 = unbounded), got {window!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise _err(f"softcap must be a float >= 0 (0 = off), got {softcap!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.dtype != torch.float32 or \
                tuple(alibi_slopes.shape) not in ((hq,), (b, hq)) or alibi_slopes.device != q.device:
            raise _err(f"alibi_slopes must be a torch.float32 tensor of shape ({hq},) or ({b}, {hq}) on {q.device}")
        alibi_slopes = alibi_slopes.contiguous()
    left, right = window
    right = 0 if causal else right
    left = UNBOUNDED if left < 0 else left
    right = UNBOUNDED if right < 0 else right
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    out, lse = torch.ops.fasttfm.attn_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, float(softmax_scale),
                                             left, right, float(softcap), alibi_slopes, int(num_splits),
                                             cache_batch_idx, cache_leftpad, block_table, key_padding_mask)
    return (out, lse) if return_lse else out

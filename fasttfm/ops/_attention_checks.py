"""Argument checks of ``fasttfm.attention`` (clear errors naming the argument and the accepted
values). Split from fasttfm/ops/attention.py."""
import torch
from torch import Tensor

from ._autocast import autocast_dtype

__all__ = []

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _canon(t: Tensor, layout: str) -> Tensor:
    """The (B, H, N, D) view of a tensor in ``layout`` (no copy); thd -> (1, H, total, D)."""
    if layout == "bhnd":
        return t
    if layout == "bnhd":
        return t.transpose(1, 2)
    return t.transpose(0, 1).unsqueeze(0)


def _check_window(window):
    ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)
    if not ok or any(w < -1 for w in window):
        raise ValueError(f"attention: window must be a pair (left, right) of ints >= -1 (-1 = unbounded), "
                         f"got {window!r}")


def _check_inputs(q, k, v, layout, varlen):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"attention: {name}.dtype must be one of float16, bfloat16, float32, got {t.dtype}")
        want = 3 if varlen else 4
        if t.dim() != want:
            shape = "(total, H, D) with cu_seqlens" if varlen else f"4-D for layout={layout!r}"
            raise ValueError(f"attention: {name} must be {shape}, got shape {tuple(t.shape)}")
    if not (autocast_dtype(q) == autocast_dtype(k) == autocast_dtype(v)):  # as the op sees them under autocast
        raise TypeError(f"attention: q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    q4, k4, v4 = (_canon(t, layout) for t in (q, k, v))
    d, dv = q4.shape[-1], v4.shape[-1]
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k4.shape[-1] != d:
        raise ValueError(f"attention: q and k must have the same head dim (last dim), got {shapes}")
    if not 16 <= d <= 256 or not 16 <= dv <= 256:
        raise ValueError(f"attention: head dims must be in 16..256 (q/k: {d}, v: {dv}), got {shapes}")
    if k4.shape[:-1] != v4.shape[:-1]:
        raise ValueError(f"attention: k and v must have the same shape except the head dim (last dim), got {shapes}")
    hq, hkv = q4.shape[1], k4.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention: number of q heads ({hq}) must be a multiple of the number of k/v heads ({hkv})")
    if not varlen and q4.shape[0] != k4.shape[0]:
        raise ValueError(f"attention: batch sizes of q ({q4.shape[0]}) and k/v ({k4.shape[0]}) differ")


def _check_cu(name, cu, total, device):
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        desc = f"{cu.dtype} tensor of shape {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        raise ValueError(f"attention: {name} must be a 1-D torch.int32 tensor of cumulative lengths "
                         f"(batch + 1 entries, starting at 0), got {desc}")
    if cu.device != device:
        raise ValueError(f"attention: {name} must be on {device}, got {cu.device}")
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        vals = cu.tolist()
        if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])) or vals[-1] > total:
            raise ValueError(f"attention: {name} must start at 0, be non-decreasing and end at most at the "
                             f"packed length {total}, got {vals}")


def _check_slopes(slopes, hq, batch, device):
    if not isinstance(slopes, Tensor) or slopes.dtype != torch.float32 or \
            tuple(slopes.shape) not in ((hq,), (batch, hq)):
        desc = f"{slopes.dtype} tensor of shape {tuple(slopes.shape)}" if isinstance(slopes, Tensor) else \
            type(slopes).__name__
        raise ValueError(f"attention: alibi_slopes must be a torch.float32 tensor of shape ({hq},) or "
                         f"({batch}, {hq}), got {desc}")
    if slopes.device != device:
        raise ValueError(f"attention: alibi_slopes must be on {device}, got {slopes.device}")


def _desc(t):
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _check_masks(kpm, seqused, seg, b, nq, nk, device, varlen):
    """Argument checks of key_padding_mask (bool (B, Nk)), seqused_k (int32 (B,)) and segment_ids
    (integer (B, N), Nq == Nk). Values are checked only for CPU tensors outside torch.compile
    (no host sync on device tensors)."""
    given = [n for n, t in (("key_padding_mask", kpm), ("segment_ids", seg)) if t is not None]
    if given and varlen:
        raise ValueError(f"attention: {', '.join(given)} need the dense layouts 'bhnd'/'bnhd' "
                         f"(with cu_seqlens, pack only the valid tokens instead)")
    if kpm is not None:
        if not isinstance(kpm, Tensor) or kpm.dtype != torch.bool or tuple(kpm.shape) != (b, nk):
            raise ValueError(f"attention: key_padding_mask must be a torch.bool tensor of shape (B, Nk) = "
                             f"({b}, {nk}) (True = attend), got {_desc(kpm)}")
        if kpm.device != device:
            raise ValueError(f"attention: key_padding_mask must be on {device}, got {kpm.device}")
    if seqused is not None:
        if not isinstance(seqused, Tensor) or seqused.dtype != torch.int32 or tuple(seqused.shape) != (b,):
            raise ValueError(f"attention: seqused_k must be a torch.int32 tensor of shape (B,) = ({b},) "
                             f"(varlen: one entry per sequence), got {_desc(seqused)}")
        if seqused.device != device:
            raise ValueError(f"attention: seqused_k must be on {device}, got {seqused.device}")
        if seqused.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(((seqused < 0) | (seqused > nk)).any()):
                raise ValueError(f"attention: seqused_k values must be in 0..Nk = 0..{nk}, got {seqused.tolist()}")
    if seg is not None:
        ok_dtype = isinstance(seg, Tensor) and not seg.is_floating_point() and not seg.is_complex() \
            and seg.dtype != torch.bool
        if not ok_dtype or tuple(seg.shape) != (b, nq):
            raise ValueError(f"attention: segment_ids must be an integer tensor of shape (B, N) = ({b}, {nq}), "
                             f"got {_desc(seg)}")
        if nq != nk:
            raise ValueError(f"attention: segment_ids need Nq == Nk (packed sequences in one row), got Nq={nq}, "
                             f"Nk={nk}")
        if seg.device != device:
            raise ValueError(f"attention: segment_ids must be on {device}, got {seg.device}")

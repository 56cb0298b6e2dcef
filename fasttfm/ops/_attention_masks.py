"""Per-sequence masks of the attention op: the CPU path's visibility masks and the device-side
bounds the kernels read (key_bounds, segment_bounds), no host sync. Split from fasttfm/ops/attention.py."""
import torch
from torch import Tensor

__all__ = ["key_bounds", "segment_bounds"]


def _visible(nq, nk, left, right, chunk, device):
    """(nq, nk) bool mask of the CPU path (bottom-right aligned; left/right UNBOUNDED = no limit)."""
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=device)[None, :]
    vis = (j >= i - left) & (j <= i + right)
    if chunk:
        vis &= torch.div(i, chunk, rounding_mode="floor") == torch.div(j, chunk, rounding_mode="floor")
    return vis


def _runs(segment_ids):
    """int64 (B, N) index of the maximal run of equal ids each token belongs to (0, 1, ... per row)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.nn.functional.pad(change.cumsum(-1), (1, 0))


def _visible_batched(nq, nk, left, right, chunk, kpm, seqused, seg, device):
    """(B, 1, 1, nq, nk) bool mask of the CPU path with per-sequence masks: the window/chunk mask
    bottom-right aligned to seqused_k[b] (else nk), keys >= seqused_k[b] and keys with
    key_padding_mask False hidden, and (segment_ids) query/key in the same run."""
    used = torch.full((1,), nk, device=device, dtype=torch.int64) if seqused is None else seqused.long()
    used = used.clamp(0, nk)
    i = torch.arange(nq, device=device)[None, :, None] + (used[:, None, None] - nq)
    j = torch.arange(nk, device=device)[None, None, :]
    vis = (j >= i - left) & (j <= i + right) & (j < used[:, None, None])
    if chunk:
        vis &= torch.div(i, chunk, rounding_mode="floor") == torch.div(j, chunk, rounding_mode="floor")
    if kpm is not None:
        vis = vis & kpm[:, None, :]
    if seg is not None:
        r = _runs(seg)
        vis = vis & (r[:, :, None] == r[:, None, :])
    return vis[:, None, None], used - nq


def segment_bounds(segment_ids: Tensor) -> Tensor:
    """int32 (B, 2, N): first and last index of the run of equal ids holding each token, computed
    on the device with cummax/cummin (no host sync)."""
    b, n = segment_ids.shape
    idx = torch.arange(n, device=segment_ids.device).expand(b, n)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.nn.functional.pad(change, (1, 0), value=True)  # token i opens a run
    ends = torch.nn.functional.pad(change, (0, 1), value=True)  # token i closes a run
    first = torch.where(starts, idx, 0).cummax(-1).values
    last = torch.where(ends, idx, n - 1).flip(-1).cummin(-1).values.flip(-1)
    return torch.stack((first, last), 1).to(torch.int32)


def key_bounds(key_padding_mask: Tensor) -> Tensor:
    """int32 (B, 2): first and last key with key_padding_mask True per sequence (Nk and -1 when
    none), computed on the device (no host sync); the kernels skip kv tiles outside them."""
    b, nk = key_padding_mask.shape
    idx = torch.arange(nk, device=key_padding_mask.device).expand(b, nk)
    first = torch.where(key_padding_mask, idx, nk).amin(-1)
    last = torch.where(key_padding_mask, idx, -1).amax(-1)
    return torch.stack((first, last), 1).to(torch.int32)


def _kernel_masks(kpm, seqused, seg):
    """Launcher keyword arguments of the per-sequence masks (the kernels' KPAD/SEQUSED/SEGMENTS)."""
    kw = {}
    if kpm is not None:
        km = kpm if kpm.stride(-1) == 1 else kpm.contiguous()
        kw.update(key_mask=km.view(torch.int8), key_bounds=key_bounds(kpm))
    if seqused is not None:
        kw.update(seqused_k=seqused)
    if seg is not None:
        kw.update(segment_bounds=segment_bounds(seg))
    return kw

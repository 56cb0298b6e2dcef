"""Context parallelism on torch.distributed: ring attention over a sequence sharded across ranks.

    import fasttfm.distributed as fd
    q, k, v = (fd.shard_sequence(t, dim=2, order="zigzag") for t in (q_full, k_full, v_full))
    out = fd.ring_attention(q, k, v, causal=True, order="zigzag")          # this rank's rows
    out_full = fd.unshard_sequence(out, dim=2, order="zigzag")             # all_gather, optional

Transport: ``torch.distributed`` point-to-point (``isend``/``irecv`` batched per hop) on the given
process group: NCCL for CUDA tensors, gloo for CPU tensors. The per-step attention calls are
fasttfm's own ops (see ``fasttfm.ops.ring_attention`` for the algorithm).
"""
import torch
import torch.distributed as dist

from .ops._autocast import autocast_dtype
from .ops.attention import UNBOUNDED, _canon, _check_inputs, _check_window
from .ops.ring_attention import KERNEL_CALLS, ORDERS, RingAttention, ring_bytes, shard_segments

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence", "shard_positions", "ring_bytes",
           "KERNEL_CALLS", "ORDERS"]

_LAYOUTS = ("bhnd", "bnhd")
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fasttfm.distributed: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first, e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_order(order, world, what):
    """The number of equal chunks the sequence is cut into (W, or 2W for zigzag)."""
    if order not in ORDERS:
        raise ValueError(f"{what}: order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    return world * (2 if order == "zigzag" else 1)


def shard_positions(n_total: int, *, rank=None, world=None, group=None, order="contiguous", device=None):
    """int64 (n_total / W,) global positions of this rank's rows (for RoPE / learned positions)."""
    if rank is None or world is None:
        rank, world = _group_info(group)
    parts = _check_order(order, world, "shard_positions")
    if n_total % parts:
        raise ValueError(f"shard_positions: sequence length {n_total} must be divisible by {parts} "
                         f"(world size {world}{', x 2 for zigzag' if order == 'zigzag' else ''})")
    n = n_total // world
    return torch.cat([torch.arange(g, g + ln, device=device) for g, _, ln in shard_segments(rank, world, n, order)])


def shard_sequence(x, dim=1, *, rank=None, world=None, group=None, order="contiguous"):
    """This rank's shard of ``x`` along ``dim`` (a copy for zigzag, a view for contiguous).

    Every rank of the group must pass the same full tensor; the length along ``dim`` must be a
    multiple of W (2W for zigzag). Raises the same ValueError on every rank otherwise."""
    if rank is None or world is None:
        rank, world = _group_info(group)
    n_total = x.shape[dim]
    parts = _check_order(order, world, "shard_sequence")
    if n_total % parts:
        raise ValueError(f"shard_sequence: length {n_total} of dim {dim} must be divisible by {parts} "
                         f"(world size {world}{', x 2 for zigzag' if order == 'zigzag' else ''})")
    n = n_total // world
    pieces = [x.narrow(dim, g, ln) for g, _, ln in shard_segments(rank, world, n, order)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def unshard_sequence(x, dim=1, *, group=None, order="contiguous"):
    """The full sequence from every rank's shard (an all_gather; not differentiable)."""
    rank, world = _group_info(group)
    _check_order(order, world, "unshard_sequence")
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    n = x.shape[dim]
    out = torch.empty((*x.shape[:dim], n * world, *x.shape[dim + 1:]), dtype=x.dtype, device=x.device)
    for r, part in enumerate(parts):
        for g, lo, ln in shard_segments(r, world, n, order):
            out.narrow(dim, g, ln).copy_(part.narrow(dim, lo, ln))
    return out


def _check_across_ranks(meta, group, device, err):
    """All-gather ``meta`` ([failed flag] + problem ints) and raise on every rank when a rank's local
    checks failed (``err`` there, a ValueError naming the ranks elsewhere) or the problems differ."""
    t = torch.tensor(meta, dtype=torch.int64, device=device)
    _, world = _group_info(group)
    got = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(got, t, group=group)
    rows = [g.tolist() for g in got]
    bad = [r for r, row in enumerate(rows) if row[0]]
    if err is not None:
        raise err
    if bad:
        raise ValueError(f"ring_attention: rank(s) {bad} of the group rejected their input (see the error "
                         f"there); every rank stops")
    rows = [row[1:] for row in rows]
    if any(r != rows[0] for r in rows):
        names = ("batch", "q heads", "kv heads", "shard length", "head dim", "dtype", "left", "right", "order")
        diff = [f"{nm}: {[r[i] for r in rows]}" for i, nm in enumerate(names) if len({r[i] for r in rows}) > 1]
        raise ValueError("ring_attention: shards differ across ranks (every rank must hold an equal shard of the "
                         "same problem); per rank " + "; ".join(diff))


def _local_checks(q, k, v, causal, window, layout, order):
    if layout not in _LAYOUTS:
        raise ValueError(f"ring_attention: layout must be 'bhnd' or 'bnhd', got {layout!r}")
    if order not in ORDERS:
        raise ValueError(f"ring_attention: order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    _check_inputs(q, k, v, layout, False)
    _check_window(tuple(window) if isinstance(window, list) else window)
    q4, k4, v4 = (_canon(t, layout) for t in (q, k, v))
    if q4.shape[2] != k4.shape[2]:
        raise ValueError(f"ring_attention: q and k/v shards must have the same length, got {q4.shape[2]} and "
                         f"{k4.shape[2]}")
    if order == "zigzag" and q4.shape[2] % 2:
        raise ValueError(f"ring_attention: order='zigzag' needs an even shard length, got {q4.shape[2]}")
    left, right = window
    right = 0 if causal else right
    left = UNBOUNDED if left < 0 else left
    right = UNBOUNDED if right < 0 else right
    return q4, k4, v4, left, right


def ring_attention(q, k, v, *, group=None, causal=False, window=(-1, -1), softmax_scale=None, layout="bhnd",
                   order="contiguous", return_lse=False, check=True):
    """Attention over a sequence sharded across the ranks of ``group`` (context parallelism).

    Each rank passes its shard: q (B, Hq, n, D), k/v (B, Hkv, n, D) for layout "bhnd" ((B, n, H, D)
    for "bnhd"), the same n on every rank (global length N = W n). Rows are the rank's global
    positions in ``order``: "contiguous" (rank r holds [r n, (r + 1) n)) or "zigzag" (chunks r and
    2W - 1 - r of 2W, n even; load-balanced for causal; see ``shard_sequence``). Hq % Hkv == 0
    (GQA), head dim 16..256, fp16/bf16/fp32, one dtype.

    Masks in global positions, as ``fasttfm.attention`` on the gathered sequence: query i sees key
    j iff i - left <= j <= i + right (window=(left, right), -1 unbounded; causal sets right = 0).
    Steps whose K/V shard no local query can see make no kernel call.

    Returns out (q's shape and layout, q's dtype) and with ``return_lse`` the fp32 LSE (B, Hq, n),
    both differentiable (one autograd function; gradients equal those of ``fasttfm.attention`` on
    the gathered sequence up to summation order, deterministic for a given W).

    Communication per rank and call (elem = bytes per element of k): forward (W - 1) x 2 B Hkv n D x
    elem; backward (W - 1) x 2 B Hkv n D x elem + W x 2 B Hkv n D x 4 (dK/dV travel in fp32).
    ``check`` all-gathers the problem's shape once per call and raises the same ValueError on every
    rank when the shards differ (a host sync; pass False once shapes are known to agree).
    """
    _group_info(group)
    try:  # local checks first; with ``check`` their verdict is shared, so no rank waits on one that raised
        q4, k4, v4, left, right = _local_checks(q, k, v, causal, window, layout, order)
        err = None
    except (TypeError, ValueError) as exc:
        err = exc
    if check:
        meta = [0] * 9 if err else [q4.shape[0], q4.shape[1], k4.shape[1], q4.shape[2], q4.shape[3],
                                    _DTYPE_CODE[q.dtype], left, right, ORDERS.index(order)]
        _check_across_ranks([int(err is not None)] + meta, group, q.device if isinstance(q, torch.Tensor) else
                            "cpu", err)
    elif err is not None:
        raise err
    if softmax_scale is None:
        softmax_scale = q4.shape[-1] ** -0.5
    # under autocast, as fasttfm.attention: q/k/v in the autocast dtype (the output and dK/dV too)
    q4, k4, v4 = (t.to(autocast_dtype(t)) for t in (q4, k4, v4))
    q4, k4, v4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q4, k4, v4))
    out, lse = RingAttention.apply(q4, k4, v4, group, order, float(softmax_scale), left, right)
    if layout == "bnhd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out

"""Context-parallel (ring) attention: the autograd function behind ``fasttfm.distributed.ring_attention``.

Each of the W ranks of a process group holds a shard of the sequence (q, k, v rows); K/V shards
travel around the ring (rank r sends to r + 1, receives from r - 1) with ``isend``/``irecv`` while
the shard in hand is computed. Every per-step attention call is ``torch.ops.fasttfm.attn_fwd`` /
``attn_bwd`` (so CUDA runs fasttfm's Triton kernels, the CPU its CPU path, ``FASTTFM_EMULATE=1``
the kernels under the interpreter), with window bounds re-expressed relative to the two shards'
global offsets. Partial results are merged in fp32 with their log-sum-exps.

Shard orders (``order``), global token positions of the local rows, rank r of W, shard length n:
  * ``"contiguous"``: rows [r n, (r + 1) n).
  * ``"zigzag"``: the sequence cut in 2W chunks of c = n / 2; rank r holds chunk r then chunk
    2W - 1 - r (balances causal work: every rank sees the same number of visible pairs).

Masking (global positions, as ``fasttfm.attention`` with Nq == Nk): query i sees key j iff
i - left <= j <= i + right (``window`` (left, right), -1 unbounded; ``causal`` sets right = 0).
A (q segment, k segment) pair is *none* (no visible pair: skipped, no kernel call), *full* (every
pair visible: called unmasked) or *partial* (called with shifted bounds). Pairs are grouped into as
few calls as the masks allow (see ``step_calls``).

Backward: the mirrored ring. Each rank keeps its own dQ (fp32); dK/dV (fp32) travel with the K/V
shard they belong to, each rank adding its contribution in ring order, and arrive back at the
owner after W hops: no atomics, a fixed summation order, so the result is bitwise deterministic for
a given world size. The per-step backward takes the final merged output and LSE (Delta =
rowsum(dO * O) - dLSE), as the per-step probabilities are exp(s - LSE_final).
"""
import collections

import torch
import torch.distributed as dist
from torch import Tensor

from .attention import UNBOUNDED

__all__ = ["RingAttention", "shard_segments", "step_calls", "merge_", "KERNEL_CALLS", "BYTES_SENT", "ring_bytes"]

ORDERS = ("contiguous", "zigzag")

# per-process count of per-step kernel calls ("fwd", "bwd"); tests read it to prove skipped steps
KERNEL_CALLS = collections.Counter()
# per-process bytes this rank sent ("fwd", "bwd"): benchmarks check them against ``ring_bytes``
BYTES_SENT = collections.Counter()


# -- shard geometry --------------------------------------------------------------------------------
def shard_segments(rank: int, world: int, n: int, order: str):
    """[(global start, local start, length)] of rank ``rank``'s n local rows, in local order."""
    if order == "contiguous":
        return [(rank * n, 0, n)]
    c = n // 2
    return [(rank * c, 0, c), ((2 * world - 1 - rank) * c, c, c)]


def _pair_kind(qo, a, ko, b, left, right):
    """'none' | 'full' | 'partial' for q rows [qo, qo + a) against k rows [ko, ko + b) (global)."""
    if ko + b - 1 < qo - left or ko > qo + a - 1 + right:
        return "none"
    if ko >= qo + a - 1 - left and ko + b - 1 <= qo + right:
        return "full"
    return "partial"


def _op_bounds(qo, a, ko, b, left, right):
    """The op's (window_left, window_right) for local q rows of a segment at global qo (length a)
    against a k segment at ko (length b): the op aligns bottom-right (i' + b - a), the global mask
    needs j' + ko in [i' + qo - left, i' + qo + right]; UNBOUNDED sides stay UNBOUNDED."""
    d = (qo - ko) - (b - a)
    return (UNBOUNDED if left >= UNBOUNDED else left - d), (UNBOUNDED if right >= UNBOUNDED else right + d)


def step_calls(q_segs, k_segs, left, right):
    """Kernel calls [(q_lo, q_hi, k_lo, k_hi, win_left, win_right)] (local rows) of one ring step.

    Grouping: every pair full -> one unmasked call on the whole shards; the rank's own shard under
    plain causal (left unbounded, right 0) -> one causal call (local order is global order); a k
    segment fully seen by every q segment while all other pairs are none -> one call (all q, that
    k segment), and the mirrored q-row case; otherwise one call per pair that is not none."""
    kinds = [[_pair_kind(qo, a, ko, b, left, right) for (ko, _, b) in k_segs] for (qo, _, a) in q_segs]
    nq = sum(s[2] for s in q_segs)
    nk = sum(s[2] for s in k_segs)
    flat = [x for row in kinds for x in row]
    if all(x == "none" for x in flat):
        return []
    if all(x == "full" for x in flat):
        return [(0, nq, 0, nk, UNBOUNDED, UNBOUNDED)]
    if q_segs == k_segs and left >= UNBOUNDED and right == 0 and \
            all(q_segs[i][0] < q_segs[i + 1][0] for i in range(len(q_segs) - 1)):
        return [(0, nq, 0, nk, UNBOUNDED, 0)]
    for j, (_, k_lo, b) in enumerate(k_segs):
        col = [row[j] for row in kinds]
        rest = [row[jj] for row in kinds for jj in range(len(k_segs)) if jj != j]
        if all(x == "full" for x in col) and all(x == "none" for x in rest):
            return [(0, nq, k_lo, k_lo + b, UNBOUNDED, UNBOUNDED)]
    for i, (_, q_lo, a) in enumerate(q_segs):
        rest = [x for ii, row in enumerate(kinds) for x in row if ii != i]
        if all(x == "full" for x in kinds[i]) and all(x == "none" for x in rest):
            return [(q_lo, q_lo + a, 0, nk, UNBOUNDED, UNBOUNDED)]
    calls = []
    for i, (qo, q_lo, a) in enumerate(q_segs):
        for j, (ko, k_lo, b) in enumerate(k_segs):
            if kinds[i][j] == "full":
                calls.append((q_lo, q_lo + a, k_lo, k_lo + b, UNBOUNDED, UNBOUNDED))
            elif kinds[i][j] == "partial":
                calls.append((q_lo, q_lo + a, k_lo, k_lo + b, *_op_bounds(qo, a, ko, b, left, right)))
    return calls


def ring_bytes(batch, hkv, n, d, elem_size, world, backward=True):
    """Bytes one rank sends per call: forward (W - 1) x 2 B Hkv n D x elem (K and V, W - 1 hops);
    backward another (W - 1) x 2 B Hkv n D x elem (K/V again) + W x 2 B Hkv n D x 4 (fp32 dK/dV,
    W hops back to their owner; none when W = 1). ``backward`` adds the backward's to the forward's."""
    kv = 2 * batch * hkv * n * d
    fwd = (world - 1) * kv * elem_size
    dkv_hops = world if world > 1 else 0
    return fwd + ((world - 1) * kv * elem_size + dkv_hops * kv * 4 if backward else 0)


# -- merging ---------------------------------------------------------------------------------------
def merge_(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """In place: (acc_out, acc_lse) <- the softmax-weighted union of two partial results (fp32).

    acc_out (B, H, n, D) fp32, acc_lse (B, H, n) fp32; out/lse the same shapes (out any float dtype).
    lse_new = logaddexp(acc_lse, lse); out = acc_out e^{acc_lse - lse_new} + out e^{lse - lse_new}.
    Rows empty in both (LSE -inf) stay 0 / -inf without NaN."""
    new = torch.logaddexp(acc_lse, lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    wa = torch.exp(acc_lse - safe).unsqueeze(-1)
    wb = torch.exp(lse - safe).unsqueeze(-1)
    acc_out.mul_(wa).add_(out.float() * wb)
    acc_lse.copy_(new)


# -- the ring --------------------------------------------------------------------------------------
class _Ring:
    """Point-to-point neighbours of this rank in ``group`` and one-step exchanges of a buffer.

    NCCL sends device tensors directly; gloo sends host memory, so CUDA tensors on a gloo group
    (several ranks sharing one GPU, tests) are staged through the CPU."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        glob = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.prev = glob((self.rank + 1) % self.world), glob((self.rank - 1) % self.world)
        self.stage = dist.get_backend(group) == "gloo"

    def start(self, send: Tensor, phase: str):
        """Post send of ``send`` to the next rank and a receive from the previous one: pending state."""
        BYTES_SENT[phase] += send.numel() * send.element_size()
        device = send.device
        if self.stage and send.is_cuda:
            send = send.cpu()
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        return recv, dist.batch_isend_irecv(ops), device, send

    @staticmethod
    def finish(pending):
        recv, works, device, _ = pending      # the send buffer stays referenced until its work is done
        for w in works:
            w.wait()
        return recv.to(device)


def _rows(t, lo, hi):
    return t[:, :, lo:hi]


class RingAttention(torch.autograd.Function):
    """forward(q, k, v, group, order, scale, left, right) -> (out, lse).

    q (B, Hq, n, D), k/v (B, Hkv, n, D) canonical (unit last stride) local shards; left/right op
    window sides (UNBOUNDED = none, global-position semantics). out (B, Hq, n, D) in q's dtype,
    lse (B, Hq, n) fp32 (-inf for rows that see no key)."""

    @staticmethod
    def forward(ctx, q, k, v, group, order, scale, left, right):
        ring = _Ring(group)
        n = q.shape[2]
        q_segs = shard_segments(ring.rank, ring.world, n, order)
        kv = torch.stack([k, v]).contiguous()                  # (2, B, Hkv, n, D): one message per hop
        acc_out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        acc_lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        for step in range(ring.world):
            pending = ring.start(kv, "fwd") if step + 1 < ring.world else None   # next shard travels meanwhile
            src = (ring.rank - step) % ring.world
            k_segs = shard_segments(src, ring.world, n, order)
            for q_lo, q_hi, k_lo, k_hi, wl, wr in step_calls(q_segs, k_segs, left, right):
                KERNEL_CALLS["fwd"] += 1
                o, l = torch.ops.fasttfm.attn_fwd(_rows(q, q_lo, q_hi), _rows(kv[0], k_lo, k_hi),
                                                  _rows(kv[1], k_lo, k_hi), None, None, q_hi - q_lo,
                                                  k_hi - k_lo, scale, wl, wr, 0, "bhnd")
                merge_(_rows(acc_out, q_lo, q_hi), _rows(acc_lse, q_lo, q_hi), o, l)
            if pending is not None:
                kv = ring.finish(pending)
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.cfg = (group, order, scale, left, right)
        ctx.set_materialize_grads(False)
        return out, acc_lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, order, scale, left, right = ctx.cfg
        if dout is None:
            dout = torch.zeros_like(out)
        ring = _Ring(group)
        n = q.shape[2]
        q_segs = shard_segments(ring.rank, ring.world, n, order)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)   # travels with kv
        for step in range(ring.world):
            pending = ring.start(kv, "bwd") if step + 1 < ring.world else None
            src = (ring.rank - step) % ring.world
            for q_lo, q_hi, k_lo, k_hi, wl, wr in step_calls(q_segs, shard_segments(src, ring.world, n, order),
                                                             left, right):
                KERNEL_CALLS["bwd"] += 1
                g = torch.ops.fasttfm.attn_bwd(
                    _rows(dout, q_lo, q_hi), _rows(q, q_lo, q_hi), _rows(kv[0], k_lo, k_hi),
                    _rows(kv[1], k_lo, k_hi), _rows(out, q_lo, q_hi), _rows(lse, q_lo, q_hi).contiguous(),
                    None if dlse is None else _rows(dlse, q_lo, q_hi).contiguous(), None, None,
                    q_hi - q_lo, k_hi - k_lo, scale, wl, wr, 0, "bhnd")
                _rows(dq, q_lo, q_hi).add_(g[0].float())
                _rows(dkv[0], k_lo, k_hi).add_(g[1].float())
                _rows(dkv[1], k_lo, k_hi).add_(g[2].float())
            # dK/dV of this shard move on with it: after W hops they are back at their owner
            dpending = ring.start(dkv, "bwd") if ring.world > 1 else None
            if pending is not None:
                kv = ring.finish(pending)
            if dpending is not None:
                dkv = ring.finish(dpending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None

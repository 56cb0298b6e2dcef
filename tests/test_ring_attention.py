"""Context-parallel ring attention (fasttfm.distributed) on gloo, 2 and 4 processes, cpu and emu modes.

Every rank builds the same full problem from a seed drawn fresh by the parent, keeps its shard,
runs ``ring_attention`` (forward, LSE and all gradients, the LSE gradient included) and checks its
rows against a float64 reference on the gathered sequence (``dense_mask`` written from the
definition) with the relative oracle: error <= 2x (out, LSE) / 3x (grads) the error of the same
reference in the low precision. It also checks that single-process ``fasttfm.attention`` gives the
same rows (same oracle), that steps a shard cannot see made no kernel call (the count is derived
from the dense mask, not from the plan), that a second run is bitwise identical, and that bad input
raises on every rank. Processes are spawned with short init/join timeouts: a hang fails the test.
"""
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fasttfm.ops.attention import UNBOUNDED, _visible
from fasttfm.ops.ring_attention import _op_bounds, ring_bytes, shard_segments, step_calls
from tests.oracle import assert_close_oracle, require_gpu
from tests.test_attention import dense_mask, grad_floor, ref_attention

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
JOIN_TIMEOUT = 240


# -- harness ---------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        res = fn(rank, world, *args)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 -- reported to the parent
        res = {"error": traceback.format_exc()}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn(world, fn, args, tmp_path):
    """Run fn(rank, world, *args) on `world` gloo processes; [result per rank]. Fails on a hang."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT} s (hang)"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _raise_errors(results):
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if isinstance(res, dict) and "error" in res]
    assert not errors, "\n".join(errors)


# -- workers (module level: spawn pickles them by name) --------------------------------------------
def _shard(t, rank, world, order, dim=2):
    import fasttfm.distributed as fd

    return fd.shard_sequence(t, dim, rank=rank, world=world, order=order)


def _case_worker(rank, world, cases):
    import fasttfm
    import fasttfm.distributed as fd
    from fasttfm.ops.ring_attention import BYTES_SENT, KERNEL_CALLS

    report = []
    for case in cases:
        mode, dtype, b, hq, hkv, n_total, d, causal, window, order, layout, seed = case
        gen = torch.Generator().manual_seed(seed)
        q64, do64 = (torch.randn(b, hq, n_total, d, dtype=torch.float64, generator=gen) for _ in range(2))
        k64, v64 = (torch.randn(b, hkv, n_total, d, dtype=torch.float64, generator=gen) for _ in range(2))
        dl64 = torch.randn(b, hq, n_total, dtype=torch.float64, generator=gen)
        q, k, v, do = (t.to(dtype) for t in (q64, k64, v64, do64))
        dlse = dl64.float()
        mask = dense_mask(n_total, n_total, causal, window)
        scale = d ** -0.5
        refs = {}
        for name, dt in (("64", torch.float64), ("lowp", dtype)):
            qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
            o, lse = ref_attention(qq, kk, vv, mask, scale)
            gl = torch.autograd.grad([o, lse], (qq, kk, vv), [do.to(dt), dlse.to(lse.dtype)])
            refs[name] = (o, lse, *gl)
        lse32 = ref_attention(q.float(), k.float(), v.float(), mask, scale)[1]
        pos = fd.shard_positions(n_total, rank=rank, world=world, order=order)

        def mine(t, dim=2):
            return t.index_select(dim, pos)

        dev = "cuda" if mode == "cuda" else "cpu"

        def put(t):
            return (t.transpose(1, 2).contiguous() if layout == "bnhd" else t).to(dev)

        def back(t):
            return t.transpose(1, 2) if layout == "bnhd" else t

        def run():
            qs, ks, vs = (put(_shard(t, rank, world, order)).requires_grad_() for t in (q, k, v))
            with fasttfm.emulate(mode == "emu"):
                out, lse = fd.ring_attention(qs, ks, vs, causal=causal, window=window, layout=layout, order=order,
                                             return_lse=True)
                grads = torch.autograd.grad([out, lse], (qs, ks, vs), [put(_shard(do, rank, world, order)),
                                                                       _shard(dlse, rank, world, order).to(dev)])
            return tuple(t.cpu() for t in (back(out), lse, *(back(g) for g in grads)))

        KERNEL_CALLS.clear()
        BYTES_SENT.clear()
        got = run()
        calls, sent = dict(KERNEL_CALLS), dict(BYTES_SENT)
        floor_g = grad_floor(dtype, refs["64"][2:])
        assert_close_oracle(got[0], mine(refs["64"][0]), mine(refs["lowp"][0]), factor=2.0, name=f"{case} out")
        assert_close_oracle(got[1], mine(refs["64"][1]), mine(lse32), factor=2.0, floor=1e-4, name=f"{case} lse")
        for i, name in enumerate(("dq", "dk", "dv")):
            assert_close_oracle(got[2 + i], mine(refs["64"][2 + i]), mine(refs["lowp"][2 + i]), factor=3.0,
                                floor=floor_g, name=f"{case} {name}")
        # the single-process op on the gathered sequence, held to the same oracle, for the same rows
        qa, ka, va = (t.to(dev).requires_grad_() for t in (q, k, v))
        with fasttfm.emulate(mode == "emu"):
            oa, la = fasttfm.attention(qa, ka, va, causal=causal, window=window, return_lse=True)
            ga = torch.autograd.grad([oa, la], (qa, ka, va), [do.to(dev), dlse.to(dev)])
        oa, ga = oa.cpu(), [g.cpu() for g in ga]
        assert_close_oracle(mine(oa), mine(refs["64"][0]), mine(refs["lowp"][0]), factor=2.0, name="single out")
        for i, name in enumerate(("dq", "dk", "dv")):
            assert_close_oracle(mine(ga[i]), mine(refs["64"][2 + i]), mine(refs["lowp"][2 + i]), factor=3.0,
                                floor=floor_g, name=f"single {name}")
        report.append({"case": case, "calls": calls, "sent": sent, "again_equal": None,
                       "max_vs_single": max((a.double() - mine(bb).double()).abs().max().item()
                                            for a, bb in zip((got[0], *got[2:]), (oa, *ga)))})
        if case is cases[0]:  # bitwise determinism for this world size
            again = run()
            report[-1]["again_equal"] = all(torch.equal(a, bb) for a, bb in zip(got, again))
    return report


def _expected_calls(n_total, world, rank, causal, window):
    """Steps (of W) whose K/V shard some query of `rank` sees, from the dense mask (contiguous order)."""
    mask = dense_mask(n_total, n_total, causal, window)
    n = n_total // world
    rows = mask[rank * n:(rank + 1) * n]
    return sum(int(rows[:, s * n:(s + 1) * n].any()) for s in range(world))


def _bad_input_worker(rank, world):
    import fasttfm.distributed as fd

    outcomes = {}
    n = 8 if rank == 0 else 16                     # mismatched shard lengths
    q = torch.randn(1, 2, n, 16)
    try:
        fd.ring_attention(q, q, q)
        outcomes["mismatch"] = "no error"
    except ValueError as exc:
        outcomes["mismatch"] = str(exc)
    bad = torch.randn(1, 2, 8, 16, dtype=torch.float64 if rank == 1 else torch.float32)   # rank 1 only
    try:
        fd.ring_attention(bad, bad, bad)
        outcomes["dtype"] = "no error"
    except (TypeError, ValueError) as exc:
        outcomes["dtype"] = f"{type(exc).__name__}: {exc}"
    try:
        fd.shard_sequence(torch.randn(1, 2, 7 * world + 1, 16), dim=2)
        outcomes["divisible"] = "no error"
    except ValueError as exc:
        outcomes["divisible"] = str(exc)
    try:
        fd.shard_sequence(torch.randn(1, 2, 3 * world, 16), dim=2, order="zigzag")
        outcomes["zigzag"] = "no error"
    except ValueError as exc:
        outcomes["zigzag"] = str(exc)
    x = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(7))   # the same on every rank
    outcomes["unshard"] = [torch.equal(fd.unshard_sequence(fd.shard_sequence(x, 1, order=o), 1, order=o), x)
                           for o in ("contiguous", "zigzag")]
    outcomes["positions"] = [fd.shard_positions(12, order=o).tolist() for o in ("contiguous", "zigzag")]
    ok = torch.randn(1, 2, 8, 16)                    # the group still works after the errors
    outcomes["after"] = tuple(fd.ring_attention(ok, ok, ok).shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # as fasttfm.attention: q/k/v in the autocast dtype
        amp = fd.ring_attention(ok, ok, ok, causal=True)
    low = ok.bfloat16()
    outcomes["autocast"] = (amp.dtype, torch.equal(amp, fd.ring_attention(low, low, low, causal=True)))
    return outcomes


# -- single-process: the step plan against the dense mask ------------------------------------------
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("order", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (9, -1)),
                                           (False, (0, 0)), (False, (-1, 2))])
def test_step_calls_cover_the_mask_once(world, order, causal, window):
    """The calls of every (rank, step), with their shifted op windows, cover exactly the visible
    (query, key) pairs of the gathered sequence, each once; no call sees no visible pair."""
    n = 12
    n_total = n * world
    mask = dense_mask(n_total, n_total, causal, window)
    left, right = window
    right = 0 if causal else right
    left, right = (UNBOUNDED if left < 0 else left), (UNBOUNDED if right < 0 else right)
    cover = torch.zeros(n_total, n_total, dtype=torch.int64)
    for rank in range(world):
        q_segs = shard_segments(rank, world, n, order)
        qpos = torch.cat([torch.arange(g, g + ln) for g, _, ln in q_segs])
        for step in range(world):
            src = (rank - step) % world
            k_segs = shard_segments(src, world, n, order)
            kpos = torch.cat([torch.arange(g, g + ln) for g, _, ln in k_segs])
            for q_lo, q_hi, k_lo, k_hi, wl, wr in step_calls(q_segs, k_segs, left, right):
                vis = _visible(q_hi - q_lo, k_hi - k_lo, wl, wr, 0, "cpu")   # the op's own mask rule
                assert vis.any(), f"a call with nothing visible: rank {rank} step {step}"
                qi, kj = qpos[q_lo:q_hi], kpos[k_lo:k_hi]
                cover[qi[:, None].expand_as(vis)[vis], kj[None, :].expand_as(vis)[vis]] += 1
    assert torch.equal(cover, mask.long()), f"pairs covered {cover[cover != mask.long()].unique().tolist()} times"


def test_op_bounds_of_unequal_segments():
    """The shifted op window of any two segments (unequal lengths too, where the op's bottom-right
    alignment i + Nk - Nq matters) selects exactly the global mask's block."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    full = {}
    for _ in range(300):
        qo, a, ko, b = (int(x) for x in torch.randint(0, 40, (4,), generator=g))
        a, b = a % 13 + 1, b % 13 + 1
        left, right = (int(x) - 1 for x in torch.randint(0, 12, (2,), generator=g))
        key = (left, right)
        if key not in full:
            full[key] = dense_mask(60, 60, False, (left, right))
        want = full[key][qo:qo + a, ko:ko + b]
        wl, wr = _op_bounds(qo, a, ko, b, UNBOUNDED if left < 0 else left, UNBOUNDED if right < 0 else right)
        assert torch.equal(_visible(a, b, wl, wr, 0, "cpu"), want), (qo, a, ko, b, left, right, wl, wr)


# -- multi-process ---------------------------------------------------------------------------------
def _cases(mode, world):
    """(mode, dtype, B, Hq, Hkv, N, D, causal, window, order, layout, seed); odd shard lengths where the
    order allows; GQA; every dtype; emu at tiny sizes (interpreter)."""
    s = lambda: int.from_bytes(os.urandom(4), "little")  # noqa: E731
    n = 2 * world * (3 if mode == "emu" else 5)           # shard length 10 / 6 (zigzag chunks 5 / 3)
    base = [
        (mode, F32, 1, 2, 2, world * 9, 16, False, (-1, -1), "contiguous", "bhnd", s()),
        (mode, F16, 1, 4, 2, world * 9, 32, True, (-1, -1), "contiguous", "bnhd", s()),
        (mode, BF16, 2, 2, 1, n, 16, True, (-1, -1), "zigzag", "bhnd", s()),
        (mode, F16, 1, 2, 2, n, 16, False, (4, 3), "zigzag", "bhnd", s()),
        (mode, F32, 1, 2, 1, world * 7, 16, True, (5, -1), "contiguous", "bhnd", s()),
    ]
    return base if mode != "emu" or world == 2 else base[1:3]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
def test_ring_attention_matches_single_process(mode, world, tmp_path):
    """cuda: the W processes share one GPU over gloo (K/V staged through the host), which proves
    the kernels' per-step masks and merges on the device; NCCL runs the same code with one GPU each."""
    if mode == "cuda":
        require_gpu()
    cases = _cases(mode, world)
    print("cases:", cases)
    results = spawn(world, _case_worker, (cases,), tmp_path)
    _raise_errors(results)
    for rank, report in enumerate(results):
        assert report[0]["again_equal"] is True, f"rank {rank}: a second run is not bitwise identical"
        for item in report:
            (_, dtype, b, _, hkv, n_total, d, causal, window, order, _, _) = item["case"]
            # bytes posted = the documented volume: 2 B Hkv n D elements per K/V hop, fp32 dK/dV
            kv, e = 2 * b * hkv * (n_total // world) * d, torch.empty((), dtype=dtype).element_size()
            assert item["sent"] == {"fwd": (world - 1) * kv * e, "bwd": (world - 1) * kv * e + world * kv * 4}
            assert item["sent"]["fwd"] + item["sent"]["bwd"] == ring_bytes(b, hkv, n_total // world, d, e, world)
            if order == "contiguous":  # one call per step with a visible pair, none for the others
                want = _expected_calls(n_total, world, rank, causal, window)
                assert item["calls"] == {"fwd": want, "bwd": want}, f"rank {rank} {item['case']}: {item['calls']}"
            else:
                assert 0 < item["calls"]["fwd"] == item["calls"]["bwd"], item


def test_world_of_one_is_plain_attention(tmp_path):
    """W = 1: one step, no messages (the dK/dV hop to itself is skipped), the oracle still holds."""
    cases = [c for c in _cases("cpu", 1) if c[9] == "contiguous"][:2]
    results = spawn(1, _case_worker, (cases,), tmp_path)
    _raise_errors(results)
    assert [item["calls"] for item in results[0]] == [{"fwd": 1, "bwd": 1}] * 2


def test_bad_input_raises_on_every_rank(tmp_path):
    results = spawn(2, _bad_input_worker, (), tmp_path)
    _raise_errors(results)
    for rank, out in enumerate(results):
        assert "shards differ across ranks" in out["mismatch"] and "shard length: [8, 16]" in out["mismatch"], out
        if rank == 1:
            assert out["dtype"].startswith("TypeError") and "q.dtype" in out["dtype"], out
        else:
            assert "rank(s) [1]" in out["dtype"], out
        assert "must be divisible by 2" in out["divisible"], out
        assert "divisible by 4" in out["zigzag"] and "zigzag" in out["zigzag"], out
        assert out["after"] == (1, 2, 8, 16)
        assert out["unshard"] == [True, True]
        # rank r of W = 2: contiguous [6r, 6r + 6); zigzag chunks r and 3 - r of 4 chunks of 3
        assert out["positions"] == [list(range(6 * rank, 6 * rank + 6)),
                                    list(range(3 * rank, 3 * rank + 3)) + list(range(3 * (3 - rank), 3 * (4 - rank)))]
        assert out["autocast"] == (torch.bfloat16, True)

"""Context-parallel ring attention: time per call and bytes sent per rank vs one process.

``python bench/bench_ring_attention.py [--world 2] [--seqlens 512,1024] [--quick] [--device cpu|cuda] [--out DIR]``
(or ``python -m fasttfm bench ring_attention``).

Spawns ``--world`` processes (gloo on the CPU, NCCL on GPUs: one GPU per rank, so W GPUs) that each
hold N / W rows of a sequence of total length N (zigzag order for causal, contiguous otherwise)
and time ``fasttfm.distributed.ring_attention`` forward and forward+backward; rank 0 also times
single-process ``fasttfm.attention`` on the whole N (the other ranks wait), the baseline the ring
must beat once N outgrows one device. Times are rank 0's medians (the ring is lock-step).

Communication volume per rank and call (``fasttfm.ops.ring_attention.ring_bytes``), with
kv = 2 B Hkv (N / W) D elements of one K/V shard and e bytes per element:
  forward:  (W - 1) kv e              (the K/V shard travels W - 1 hops)
  backward: (W - 1) kv e + W kv 4     (K/V again, then fp32 dK/dV travel W hops back to their owner)
The bytes each rank actually posted are counted (``BYTES_SENT``) and must equal the formula; the
row notes both. On the CPU the rows say CPU (gloo over loopback, 1 thread per rank: a correctness
and overhead picture, not a scaling one).
"""
import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Row, add_common_args, device_info, write_results  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fn, device, warmup, iters, lockstep=True):
    """(median, 20%, 80%) ms over `iters` calls; with ``lockstep`` ranks barrier before each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if lockstep and dist.is_initialized():
            dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def _case_fns(case, rank, world, device):
    import fasttfm
    import fasttfm.distributed as fd

    b, h, hkv, n_total, d, dtype, causal = case
    order = "zigzag" if causal and n_total % (2 * world) == 0 else "contiguous"
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(b, hh, n_total, d, generator=g).to(device=device, dtype=dtype) for hh in (h, hkv, hkv)]
    shards = [fd.shard_sequence(t, 2, rank=rank, world=world, order=order).contiguous().requires_grad_()
              for t in full]
    do = torch.randn_like(shards[0])

    def ring_fwd():
        with torch.no_grad():
            fd.ring_attention(*shards, causal=causal, order=order, check=False)

    def ring_fwd_bwd():
        out = fd.ring_attention(*shards, causal=causal, order=order, check=False)
        torch.autograd.grad(out, shards, do)

    whole = [t.requires_grad_() for t in full]
    dwhole = torch.randn_like(whole[0])

    def one_fwd():
        with torch.no_grad():
            fasttfm.attention(*whole, causal=causal)

    def one_fwd_bwd():
        torch.autograd.grad(fasttfm.attention(*whole, causal=causal), whole, dwhole)

    return order, (ring_fwd, ring_fwd_bwd), (one_fwd, one_fwd_bwd)


def _worker(rank, world, port, device, cases, warmup, iters, out_path):
    from fasttfm.ops.ring_attention import BYTES_SENT

    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results = []
    for case in cases:
        order, ring, one = _case_fns(case, rank, world, device)
        res = {"case": case, "order": order}
        for name, fn in zip(("fwd", "fwd+bwd"), ring):
            BYTES_SENT.clear()
            fn()
            res[f"bytes {name}"] = sum(BYTES_SENT.values())
            res[f"ring {name}"] = _time(fn, device, warmup, iters)
        dist.barrier()
        if rank == 0:  # the single-process baseline, alone on the machine
            for name, fn in zip(("fwd", "fwd+bwd"), one):
                res[f"one {name}"] = _time(fn, device, warmup, iters, lockstep=False)
        dist.barrier()
        results.append(res)
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def run(args):
    from fasttfm.ops.ring_attention import ring_bytes

    device, world = args.device, args.world
    info = device_info(device)
    label = "cuda" if device == "cuda" else "CPU"
    skipped = []
    if device == "cuda" and torch.cuda.device_count() < world:
        skipped.append(f"ring_attention on cuda: needs {world} GPUs (one per rank), found {torch.cuda.device_count()}")
        print("skipped:", skipped[-1])
        write_results([], info, args.out, f"ring_attention_{device}", skipped)
        return []
    seqlens = [int(s) for s in str(args.seqlens).replace(",", " ").split()] if args.seqlens else \
        ([256, 512] if args.quick else [1024, 2048]) if device == "cpu" else ([4096, 8192] if args.quick else
                                                                              [8192, 16384, 32768])
    dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",") if d.strip()]
    if device == "cpu" and args.dtype == "float32,float16,bfloat16":   # the common default: fp32 only on the CPU
        dtypes = [torch.float32]
    cases = [(args.batch, args.heads, args.kv_heads, n, args.head_dim, dt, causal)
             for dt in dtypes for n in seqlens for causal in (True, False)]
    warmup, iters = (1, 3) if args.quick else (2, 10)
    out_path = os.path.join(args.out, f".ring_attention_{device}.pt")
    os.makedirs(args.out, exist_ok=True)
    mp.start_processes(_worker, args=(world, _free_port(), device, cases, warmup, iters, out_path), nprocs=world,
                       start_method="spawn")
    results = torch.load(out_path, weights_only=False)
    os.remove(out_path)
    rows = []
    for res in results:
        b, h, hkv, n, d, dt, causal = res["case"]
        esize = torch.empty((), dtype=dt).element_size()
        want_fwd = ring_bytes(b, hkv, n // world, d, esize, world, backward=False)
        want_all = ring_bytes(b, hkv, n // world, d, esize, world, backward=True)
        # fwd+bwd sends the forward's bytes and the backward's
        assert res["bytes fwd"] == want_fwd and res["bytes fwd+bwd"] == want_all, (res, want_fwd, want_all)
        case = f"seqlen={n} b={b} h={h} hkv={hkv} d={d} mask={'causal' if causal else 'none'} order={res['order']}"
        for direction in ("fwd", "fwd+bwd"):
            sent = res[f"bytes {direction}"]
            for prov, key, note in ((f"ring W={world}", f"ring {direction}", f"{sent} B sent per rank (formula "
                                     f"{want_fwd if direction == 'fwd' else want_all})"),
                                    ("single process", f"one {direction}", "fasttfm.attention on the whole sequence")):
                ms, lo, hi = res[key]
                rows.append(Row("ring_attention", prov, case, str(dt).replace("torch.", ""), direction, label, ms, lo,
                                hi, note=note))
                print(f"ring_attention {prov:15s} {case} {direction:8s} {ms:9.2f} ms  {note}"
                      + ("  [CPU]" if device == "cpu" else ""))
    write_results(rows, info, args.out, f"ring_attention_{device}", skipped)
    return rows


def build_parser():
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--world", type=int, default=2, help="processes (ranks); on cuda one GPU each")
    p.add_argument("--seqlens", default=None, help="total sequence lengths, e.g. 1024,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    return p


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()

"""Cross-entropy and fused linear + cross-entropy: time, GB/s and peak memory vs torch (and Liger).

``python bench/bench_cross_entropy.py [--quick] [--device cpu|cuda] [--dtype bfloat16,...] [--out DIR]``
(or ``python -m fasttfm bench cross_entropy``).

Cross-entropy bytes (minimum traffic, each input read once and each output written once):
  fwd: logits rows x V x es read, target (8 B) read, loss + lse (8 B) written per row;
  bwd: logits read + dlogits written (2 x rows x V x es), target, lse and the row gradient read;
  fwd+bwd: the sum, i.e. ~3 x rows x V x es. GB/s = bytes / median time, ``frac_peak`` = GB/s over the
  copy bandwidth measured at the start. Target on an H100: fwd+bwd >= 85% of copy bandwidth.
GPU cases: vocab 32k, 64k, 128k, 256k (262144) at min(16384, 2^28 / V) rows; providers
fasttfm, torch eager, torch.compile, Liger-Kernel when installed. Fused linear + CE: peak memory
(``torch.cuda.max_memory_allocated``) and time of fasttfm vs unfused torch vs Liger's fused loss at
hidden 4096, 8192 tokens, vocab 32k..256k, bf16.

CPU (2-core dev machines): the issue's case, 8192 x 32000 fp32 with label_smoothing=0.1, forward +
backward, fasttfm vs torch side by side in one run, repeated (interleaved), medians and their ratio;
also the opt-in ``inplace_backward`` (no fresh 8192 x 32000 gradient buffer). Fused linear + CE at
8192 x 32000 x 512 fp32: peak extra memory vs the unfused F.linear + F.cross_entropy, measured two
ways: (1) ``peak_alloc_bytes``: the torch profiler's allocation events (every CPU allocation and free
through torch's allocator, in time order; the peak of their running sum), and (2) ``peak_rss_bytes``:
the process's resident-set high-water mark (Linux VmHWM, reset through /proc/self/clear_refs) minus the
resident set before the call -- physical pages actually touched, allocator-independent.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as TF

if not __package__:  # run as a script (python bench/bench_cross_entropy.py): the checkout's root on the path (PEP 366)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import fasttfm  # noqa: E402
from .common import (Row, add_common_args, bandwidth_row, copy_bandwidth, device_info, peak_memory_mb,  # noqa: E402
                     time_fn, write_results)

__all__ = ["peak_alloc_bytes", "peak_rss_bytes", "ce_bytes", "main"]

VOCABS = [32768, 65536, 131072, 262144]


# ---- memory measurement on the CPU ----------------------------------------------------------------------

def peak_alloc_bytes(fn):
    """Peak of (bytes allocated - bytes freed) through torch's allocators while fn() runs, from the
    profiler's memory events. fn's own result is freed before returning."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return None


def peak_rss_bytes(fn):
    """Resident-set high-water mark during fn() minus the resident set before it (Linux only; None
    elsewhere). Counts pages touched, whoever allocated them."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = _status_kb("VmRSS:")
    out = fn()
    peak = _status_kb("VmHWM:")
    del out
    return None if base is None or peak is None else (peak - base) * 1024


# ---- cross-entropy throughput -----------------------------------------------------------------------------

def ce_bytes(rows, vocab, es, direction):
    fwd = rows * vocab * es + rows * (8 + 8)
    bwd = 2 * rows * vocab * es + rows * (8 + 4 + 4)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def ce_providers(device):
    fns, skipped = {}, []
    fns["fasttfm"] = lambda x, t: fasttfm.cross_entropy(x, t, label_smoothing=0.1)
    fns["torch"] = lambda x, t: TF.cross_entropy(x, t, label_smoothing=0.1)
    if device == "cuda":
        fns["torch.compile"] = torch.compile(fns["torch"])
        if importlib.util.find_spec("liger_kernel") is not None:
            from liger_kernel.transformers.functional import liger_cross_entropy

            fns["liger"] = lambda x, t: liger_cross_entropy(x, t, label_smoothing=0.1)
        else:
            skipped.append("liger: not installed")
    else:
        skipped += ["torch.compile: GPU only in this benchmark", "liger: GPU only"]
    return fns, skipped


def run_gpu_ce(args, peak, rows_out, device="cuda", vocabs=None, max_rows=16384):
    """GB/s and peak memory over vocabularies (device/vocabs/max_rows only change for the CPU smoke test)."""
    dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    vocabs = vocabs or (VOCABS[:2] if args.quick else VOCABS)
    fns, skipped = ce_providers(device)
    for dtype in dtypes:
        es = torch.tensor([], dtype=dtype).element_size()
        for vocab in vocabs:
            rows = min(max_rows, 2**28 // vocab)
            x = torch.randn(rows, vocab, device=device, dtype=dtype, requires_grad=True)
            t = torch.randint(0, vocab, (rows,), device=device)
            for name, fn in fns.items():
                def fwd():
                    with torch.no_grad():
                        return fn(x, t)

                def fwd_bwd():
                    return torch.autograd.grad(fn(x, t), x)

                for direction, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    rows_out.append(bandwidth_row("cross_entropy", name, f"rows={rows} vocab={vocab}", dtype, direction,
                                                  device, f, ce_bytes(rows, vocab, es, direction), peak, memory=True))
    return skipped


def run_gpu_lce(args, rows_out, device="cuda", tokens=8192, hidden=4096, vocabs=None):
    """Fused linear + CE: time and peak memory vs unfused torch and Liger (bf16)."""
    skipped = []
    liger = None
    if importlib.util.find_spec("liger_kernel") is not None and device == "cuda":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1)
    else:
        skipped.append("liger fused linear + CE: not installed")
    for vocab in vocabs or (VOCABS[:2] if args.quick else VOCABS):
        h = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16) / hidden**0.5).requires_grad_(True)
        t = torch.randint(0, vocab, (tokens,), device=device)
        provs = {"fasttfm": lambda: fasttfm.linear_cross_entropy(h, w, t, label_smoothing=0.1),
                 "torch (unfused)": lambda: TF.cross_entropy(TF.linear(h, w).float(), t, label_smoothing=0.1)}
        if liger is not None:
            provs["liger"] = lambda: liger(w, h, t)
        for name, loss_fn in provs.items():
            def step():
                return torch.autograd.grad(loss_fn(), (h, w))

            try:
                ms, lo, hi = time_fn(step, device)
                mem = peak_memory_mb(step, device)
            except torch.OutOfMemoryError:
                skipped.append(f"linear_cross_entropy {name} V={vocab}: out of memory")
                torch.cuda.empty_cache()
                continue
            rows_out.append(Row("linear_cross_entropy", name, f"tokens={tokens} hidden={hidden} vocab={vocab}",
                                "bfloat16", "fwd+bwd", device, ms, lo, hi, peak_mem_mb=mem))
            print(f"lce {name:16s} V={vocab:6d} bf16 fwd+bwd {ms:8.3f} ms  peak {mem:8.0f} MiB", flush=True)
    return skipped


# ---- CPU: the cases ---------------------------------------------------------------------------------

def run_cpu(args, peak, rows_out):
    rows, vocab = (2048, 32000) if args.quick else (8192, 32000)
    repeats = 3 if args.quick else args.repeats
    x = torch.randn(rows, vocab, requires_grad=True)
    t = torch.randint(0, vocab, (rows,))
    fresh = {}  # inplace_backward consumes its logits: each timed run gets a copy made outside the timing

    def inplace_run():
        xi = fresh.pop("x")
        return torch.autograd.grad(fasttfm.cross_entropy(xi, t, label_smoothing=0.1, inplace_backward=True), xi)

    provs = {
        "fasttfm": lambda: torch.autograd.grad(fasttfm.cross_entropy(x, t, label_smoothing=0.1), x),
        "fasttfm inplace_backward": inplace_run,
        "torch": lambda: torch.autograd.grad(TF.cross_entropy(x, t, label_smoothing=0.1), x),
    }
    times = {k: [] for k in provs}
    for _ in range(repeats + 1):  # interleaved, so load changes hit every provider alike; first round: warm-up
        for name, f in provs.items():
            if name == "fasttfm inplace_backward":
                fresh["x"] = x.detach().clone().requires_grad_(True)
            t0 = time.perf_counter()
            out = f()
            times[name].append(time.perf_counter() - t0)
            del out
    times = {k: v[1:] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    nbytes = ce_bytes(rows, vocab, 4, "fwd+bwd")
    for name in provs:
        gbps = nbytes / med[name] / 1e9
        rows_out.append(Row("cross_entropy", name, f"rows={rows} vocab={vocab} label_smoothing=0.1", "float32",
                            "fwd+bwd", "CPU", med[name] * 1e3, min(times[name]) * 1e3, max(times[name]) * 1e3, gbps,
                            float("nan"), gbps / peak,
                            note=f"median of {repeats}; all runs (s): " + ", ".join(f"{v:.2f}" for v in times[name])))
        print(f"ce  {name:26s} {rows}x{vocab} fp32 fwd+bwd  median {med[name]:.3f} s  max {max(times[name]):.3f} s  "
              f"({gbps:.1f} GB/s) [CPU] runs {[round(v, 2) for v in times[name]]}", flush=True)
    print(f"CPU speed-up over torch (label_smoothing=0.1, fwd+bwd, medians of {repeats}): "
          f"{med['torch'] / med['fasttfm']:.1f}x (new gradient buffer), "
          f"{med['torch'] / med['fasttfm inplace_backward']:.1f}x (inplace_backward); steady: fasttfm's max "
          f"{max(times['fasttfm']):.3f} s {'<' if max(times['fasttfm']) < med['torch'] else '>='} torch's median "
          f"{med['torch']:.3f} s", flush=True)
    fresh = statistics.median([_timed(lambda: torch.empty(rows, vocab).fill_(0.0)) for _ in range(repeats)])
    print(f"  for scale: a fresh {rows}x{vocab} fp32 buffer (allocate + first touch) takes {fresh:.3f} s here; "
          f"reading it once {statistics.median([_timed(lambda: x.detach().sum()) for _ in range(repeats)]):.3f} s")
    del x


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_cpu_lce(args, rows_out):
    tokens, vocab, hidden = (2048, 8000, 128) if args.quick else (8192, 32000, 512)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,))
    provs = {"fasttfm fused": lambda: torch.autograd.grad(fasttfm.linear_cross_entropy(h, w, t, label_smoothing=0.1),
                                                          (h, w)),
             "torch unfused": lambda: torch.autograd.grad(TF.cross_entropy(TF.linear(h, w), t, label_smoothing=0.1),
                                                          (h, w))}
    res = {}
    for name, f in provs.items():  # GEMM-bound (minutes on 2 cores): one run per measurement
        alloc = peak_alloc_bytes(f)
        t0 = time.perf_counter()
        rss = peak_rss_bytes(f)
        elapsed = time.perf_counter() - t0
        res[name] = (alloc, rss)
        rows_out.append(Row("linear_cross_entropy", name, f"tokens={tokens} vocab={vocab} hidden={hidden}", "float32",
                            "fwd+bwd", "CPU", elapsed * 1e3, peak_mem_mb=alloc / 2**20,
                            note=f"peak RSS {rss / 2**20:.0f} MiB" if rss is not None else "no RSS on this OS"))
        rss_mb = rss / 2**20 if rss is not None else float("nan")
        print(f"lce {name:14s} {tokens}x{vocab}x{hidden} fp32 fwd+bwd {elapsed:.2f} s  peak extra: allocator "
              f"{alloc / 2**20:.0f} MiB, RSS {rss_mb:.0f} MiB [CPU]", flush=True)
    (fa, fr), (ua, ur) = res["fasttfm fused"], res["torch unfused"]
    print(f"fused / unfused peak extra memory: allocator {fa / ua:.3f}" +
          (f", RSS {fr / ur:.3f}" if fr is not None and ur else "") + " (target <= 0.25)", flush=True)


def run(args):
    device = args.device
    info = device_info(device)
    peak = copy_bandwidth(device, mb=256 if device == "cpu" else 1024)
    print(f"{info['device']}: measured copy bandwidth {peak:.1f} GB/s" + (" (CPU)" if device == "cpu" else ""))
    rows_out, skipped = [], []
    if device == "cuda":
        if args.only in (None, "ce"):
            skipped += run_gpu_ce(args, peak, rows_out)
        if args.only in (None, "lce"):
            skipped += run_gpu_lce(args, rows_out)
    else:
        skipped += ["liger: GPU only"]
        if args.only in (None, "ce"):
            run_cpu(args, peak, rows_out)
        if args.only in (None, "lce"):
            run_cpu_lce(args, rows_out)
    write_results(rows_out, info, args.out, f"cross_entropy_{device}", sorted(set(skipped)))
    for s in sorted(set(skipped)):
        print("skipped:", s)
    return rows_out


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--repeats", type=int, default=10, help="CPU: interleaved repeats per provider (median, max)")
    parser.add_argument("--only", choices=["ce", "lce"], default=None, help="only cross-entropy / fused linear + CE")
    args = parser.parse_args(argv)
    if args.dtype == "float32,float16,bfloat16" and args.device == "cuda":
        args.dtype = "float32,bfloat16"
    return run(args)


if __name__ == "__main__":
    main()

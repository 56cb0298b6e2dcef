"""Sweep attention kernel configs on the GPU at hand: which tiles are fastest, and are they right.

    python bench/tune_attention.py [--d 128 64] [--n 4096] [--dtype bf16] [--kernels fwd,dkdv,dq] [--out f.json]

For each head dim, mask (full, causal) and kernel (forward, dK/dV, dQ) every candidate config
(BLOCK_M, BLOCK_N, num_warps, num_stages) is launched through fasttfm's own launchers
(``kernels/attention.py``, ``kernels/attention_bwd.py``, ``config=``), timed with
``triton.testing.do_bench`` (median), and its outputs compared with the current default config's
(max |diff| / max |ref|; a config that launches but computes something else is marked wrong).
Shapes: B*N = 16k tokens, H*D = 2048 (FlashAttention's benchmark shapes). Candidates compile in
parallel worker processes first (Triton compiles on the CPU; they share its cache), then one
process times them back to back. Configs that fail to compile (shared memory) are listed as such.
The result is a table per (d, mask, kernel) sorted by time, and the JSON rows.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fasttfm.kernels import attention as kf, attention_bwd as kb  # noqa: E402
import fasttfm  # noqa: E402,F401  (maps kernels/ as fasttfm.kernels in a checkout)

CANDIDATES = {
    "fwd": [(bm, bn, w, s) for bm, bn in [(128, 64), (128, 128), (64, 64), (64, 128), (128, 32)]
            for w in (4, 8) for s in (2, 3, 4)],
    "dkdv": [(bm, bn, w, s) for bm, bn in [(16, 64), (32, 64), (64, 64), (16, 128), (32, 128), (64, 128)]
             for w in (4, 8) for s in (1, 2, 3)],
    "dq": [(bm, bn, w, s) for bm, bn in [(64, 32), (64, 64), (128, 32), (128, 64), (64, 128), (128, 128)]
           for w in (4, 8) for s in (1, 2, 3)],
}


def _setup(d, n, dtype, causal, device="cuda", tokens=16384, hidden=2048):
    b, h = max(1, tokens // n), max(1, hidden // d)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(4))
    out, lse = fasttfm.attention(q, k, v, causal=causal, return_lse=True)
    delta = (out.float() * do.float()).sum(-1)
    common = dict(batch=b, seqlen_q=n, seqlen_k=n, win_left=kf.UNBOUNDED, win_right=0 if causal else kf.UNBOUNDED)
    return dict(q=q, k=k, v=v, do=do, out=out, lse=lse, delta=delta, common=common, n=n, b=b, h=h)


def _runner(kernel, s, cfg, interpret=False):
    """A thunk launching ``kernel`` ("fwd", "dkdv", "dq") with config ``cfg`` (None: default) -> outputs."""
    q, k, v, do, lse, delta, c, n = s["q"], s["k"], s["v"], s["do"], s["lse"], s["delta"], s["common"], s["n"]
    scale = q.shape[-1] ** -0.5
    config = None if cfg is None else kf.AttnConfig(*cfg)
    if kernel == "fwd":
        o, l = torch.empty_like(q), torch.empty_like(lse)

        def run():
            kf.attn_fwd(q, k, v, o, l, max_seqlen_q=n, qk_scale=scale * kf.LOG2E, config=config, interpret=interpret,
                        **c)
            return o, l
    elif kernel == "dkdv":
        dk, dv = torch.empty_like(k), torch.empty_like(v)

        def run():
            kb.attn_bwd_dkdv(q, k, v, do, dk, dv, lse, delta, max_seqlen_k=n, sm_scale=scale, config=config,
                             interpret=interpret, **c)
            return dk, dv
    else:
        dq = torch.empty_like(q)

        def run():
            kb.attn_bwd_dq(q, k, v, do, dq, lse, delta, max_seqlen_q=n, sm_scale=scale, config=config,
                           interpret=interpret, **c)
            return (dq,)
    return run


def _rel(a, b):
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-6)).item() for x, y in zip(a, b))


def _flops(kernel, s, causal, d):
    pairs = s["n"] * (s["n"] + 1) // 2 if causal else s["n"] ** 2
    f = 4.0 * s["b"] * s["h"] * d * pairs
    return f * {"fwd": 1.0, "dkdv": 1.5, "dq": 1.0}[kernel]  # dK/dV: 3 of the 5 backward matmuls, dQ: 2


def sweep(args, compile_only=False, shard=(0, 1)):
    import triton.testing

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    jobs = [(d, causal, kernel, cfg) for d in args.d for causal in (False, True) for kernel in args.kernels
            for cfg in [None] + CANDIDATES[kernel]]
    if compile_only:
        jobs = [j for i, j in enumerate(jobs) if i % shard[1] == shard[0] and j[3] is not None]
    setups, refs = {}, {}
    for d, causal, kernel, cfg in jobs:
        key = (d, causal)
        if key not in setups:
            setups[key] = _setup(d, args.n, dtype, causal)
        s = setups[key]
        try:
            run = _runner(kernel, s, cfg)
            outs = [t.clone() for t in run()]
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: a row, not a crash
            rows.append(dict(d=d, causal=causal, kernel=kernel, cfg=cfg, status="error",
                             error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
            continue
        if compile_only:
            continue
        if cfg is None:
            refs[(d, causal, kernel)] = outs
        rel = _rel(outs, refs[(d, causal, kernel)]) if cfg is not None else 0.0
        ms = triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median")
        rows.append(dict(d=d, causal=causal, kernel=kernel, cfg=cfg, status="ok" if rel < 2e-2 else "wrong",
                         rel_diff=rel, ms=ms, tflops=_flops(kernel, s, causal, d) / (ms * 1e-3) / 1e12))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/tune_attention.py")
    p.add_argument("--d", type=int, nargs="+", default=[128])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--kernels", type=lambda s: s.split(","), default=["fwd", "dkdv", "dq"])
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.shard:  # a compile worker
        i, n = map(int, args.shard.split("/"))
        sweep(args, compile_only=True, shard=(i, n))
        return 0
    t0 = time.time()
    base = [sys.executable, os.path.abspath(__file__), "--d", *map(str, args.d), "--n", str(args.n), "--dtype",
            args.dtype, "--kernels", ",".join(args.kernels)]
    procs = [subprocess.Popen(base + ["--shard", f"{i}/{args.workers}"]) for i in range(args.workers)]
    for proc in procs:
        proc.wait()
    print(f"compiled in {time.time() - t0:.0f} s with {args.workers} workers", flush=True)
    rows = sweep(args)
    print(f"swept in {time.time() - t0:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "n": args.n, "dtype": args.dtype, "rows": rows}, f, indent=1)
    for (d, causal, kernel), grp in itertools.groupby(rows, key=lambda r: (r["d"], r["causal"], r["kernel"])):
        grp = sorted(grp, key=lambda r: r.get("ms", 1e9))
        default = next((r for r in grp if r["cfg"] is None), None)
        print(f"\nd{d} {'causal' if causal else 'full'} {kernel}: default "
              f"{default['ms']:.3f} ms" if default and "ms" in default else f"\nd{d} {kernel}: default failed")
        for r in grp[:6]:
            if r["status"] in ("ok", "wrong"):
                print(f"  {str(r['cfg']):>20} {r['ms']:8.3f} ms {r['tflops']:6.0f} TFLOP/s rel {r['rel_diff']:.1e} "
                      f"{r['status']}")
        bad = [r for r in grp if r["status"] != "ok"]
        if bad:
            print(f"  ({len(bad)} not ok: " + "; ".join(f"{r['cfg']} {r['status']}" for r in bad[:4]) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())

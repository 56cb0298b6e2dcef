"""Softmax throughput: GB/s over row widths and dtypes, forward and backward, plus the scaled /
masked / causal softmax of attention scores and a non-last dim.

``python bench/bench_softmax.py [--quick] [--device cpu|cuda] [--dtype float16,...] [--out DIR]``
(or ``python -m fasttfm bench softmax``).

Bytes counted (minimum traffic: every input read once, every output written once):
  forward:  x read + y written (+ the mask at its own, broadcast, size);
  backward: y + dy read, dx written.
(The causal case counts every score although the kernels skip reading hidden keys, so it may exceed
copy bandwidth: read it as "time to softmax this many scores".)
GB/s = bytes / median time; ``frac_peak`` divides by the copy bandwidth measured at the start.
Target on an H100: >= 90% of copy bandwidth for widths >= 4096 (quack reaches ~3.0 TB/s). Rows
wider than one SM's shared memory (fp32 > ~58K, bf16 > ~116K columns on sm_90) take the split
path, which reads x twice: its ceiling is ~2/3 of copy bandwidth (see csrc/softmax.cu).
Providers: fasttfm, torch eager, torch.compile (GPU), Liger-Kernel and apex when installed.
On the CPU, fasttfm runs its CPU path (aten's softmax for plain rows, the fused C++ kernel for
masked rows); every CPU row says CPU.
"""
import argparse
import importlib.util
import os
import sys

import torch

if not __package__:  # run as a script (python bench/bench_softmax.py): the checkout's root on the path (PEP 366)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import fasttfm  # noqa: E402
from .common import Rotating, add_common_args, bandwidth_row, copy_bandwidth, device_info, write_results  # noqa: E402

WIDTHS = [256, 1024, 4096, 16384, 65536, 262144]


def _masked_torch(x, mask, scale):
    """What attention fallbacks do without a fused kernel: scale, mask, causal, softmax."""
    nq, nk = x.shape[-2:]
    keep = torch.ones(nq, nk, dtype=torch.bool, device=x.device).tril(nk - nq)
    z = (x * scale).masked_fill(~(mask & keep), float("-inf"))
    return torch.softmax(z, -1)


def providers(device):
    """{name: (softmax(x, dim), masked(x, mask, scale) or None)} and the skipped peers."""
    fns, skipped = {}, []
    fns["fasttfm"] = (lambda x, dim: fasttfm.softmax(x, dim),
                      lambda x, m, s: fasttfm.scaled_masked_softmax(x, m, s, causal=True))
    fns["torch"] = (lambda x, dim: torch.softmax(x, dim), _masked_torch)
    if device == "cuda":
        fns["torch.compile"] = (torch.compile(lambda x, dim: torch.softmax(x, dim)), torch.compile(_masked_torch))
    else:
        skipped.append("torch.compile: GPU only in this benchmark (CPU inductor codegen is not the comparison users make)")
    if importlib.util.find_spec("liger_kernel") is None:
        skipped.append("liger: not installed")
    elif device != "cuda":
        skipped.append("liger: GPU only")
    else:
        try:
            from liger_kernel.transformers.functional import liger_softmax

            fns["liger"] = (lambda x, dim: liger_softmax(x) if dim in (-1, x.dim() - 1) else None, None)
        except ImportError as e:
            skipped.append(f"liger: installed but its softmax is not importable ({e})")
    if importlib.util.find_spec("apex") is None:
        skipped.append("apex: not installed")
    else:
        skipped.append("apex: installed, but its scaled_masked_softmax extension needs a Megatron mask layout; "
                       "not wired in this version of the benchmark")
    return fns, skipped


def _fwd_bwd_rows(op, name, case, dtype, device, inputs, call, fwd_bytes, bwd_bytes, peak):
    """Time call(x) forward (no grad) and its backward, rotating input sets."""
    def fwd():
        x, _ = inputs.next()
        with torch.no_grad():
            return call(x)

    if fwd() is None:
        return []
    outs = [(s, call(s[0])) for s in inputs.sets]
    k = [0]

    def bwd():
        (x, dy), y = outs[k[0] % len(outs)]
        k[0] += 1
        return torch.autograd.grad(y, x, dy, retain_graph=True)

    return [bandwidth_row(op, name, case, dtype, "fwd", device, fwd, fwd_bytes, peak),
            bandwidth_row(op, name, case, dtype, "bwd", device, bwd, bwd_bytes, peak)]


def run(args):
    device = args.device
    dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    widths = [1024, 4096] if args.quick else WIDTHS
    elems = (2**20 if device == "cpu" else 2**26) // (4 if args.quick else 1)
    peak = copy_bandwidth(device, mb=64 if device == "cpu" else 512)
    info = device_info(device)
    print(f"{info['device']}: measured copy bandwidth {peak:.1f} GB/s" + (" (CPU)" if device == "cpu" else ""))
    fns, skipped = providers(device)
    nsets = 1 if device == "cpu" else 3
    rows_out = []
    for dtype in dtypes:
        es = torch.tensor([], dtype=dtype).element_size()
        for cols in widths:  # last dim
            rows = max(1, elems // cols)

            def make():
                x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)
                return x, torch.randn(rows, cols, device=device, dtype=dtype)

            inputs = Rotating(make, nsets)
            for name, (soft, _) in fns.items():
                rows_out += _fwd_bwd_rows("softmax", name, f"rows={rows} cols={cols}", dtype, device, inputs,
                                          lambda x, soft=soft: soft(x, -1), 2 * rows * cols * es, 3 * rows * cols * es,
                                          peak)
        # a non-last dim: (B, C, H*W) over C, contiguous along H*W
        b, c = 4, 64
        hw = max(1, elems // (b * c))
        inputs = Rotating(lambda: (torch.randn(b, c, hw, device=device, dtype=dtype, requires_grad=True),
                                   torch.randn(b, c, hw, device=device, dtype=dtype)), nsets)
        for name, (soft, _) in fns.items():
            if name == "liger":
                continue
            n = b * c * hw
            rows_out += _fwd_bwd_rows("softmax_dim1", name, f"shape=({b},{c},{hw}) dim=1", dtype, device, inputs,
                                      lambda x, soft=soft: soft(x, 1), 2 * n * es, 3 * n * es, peak)
        # attention scores: (B, H, N, N), bool key-padding mask (B, 1, 1, N), causal, scale
        bsz, heads, n = 4, 16, (256 if device == "cpu" else 2048)
        mask = torch.rand(bsz, 1, 1, n, device=device) > 0.1
        inputs = Rotating(lambda: (torch.randn(bsz, heads, n, n, device=device, dtype=dtype, requires_grad=True),
                                   torch.randn(bsz, heads, n, n, device=device, dtype=dtype)), nsets)
        total = bsz * heads * n * n
        for name, (_, masked) in fns.items():
            if masked is None:
                continue
            rows_out += _fwd_bwd_rows("masked_softmax", name, f"B={bsz} H={heads} N={n} causal+pad", dtype, device,
                                      inputs, lambda x, masked=masked: masked(x, mask, 0.125),
                                      2 * total * es + mask.numel(), 3 * total * es, peak)
    write_results(rows_out, info, args.out, f"softmax_{device}", sorted(skipped))
    for s in sorted(skipped):
        print("skipped:", s)
    return rows_out


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

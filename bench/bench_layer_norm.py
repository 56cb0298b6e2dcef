"""LayerNorm / RMSNorm throughput: GB/s over hidden sizes and dtypes, forward and backward.

``python bench/bench_layer_norm.py [--quick] [--device cpu|cuda] [--dtype float16,...] [--out DIR]``
(or ``python -m fasttfm bench layer_norm``).

Bytes counted (minimum traffic: every input read once, every output written once):
  forward:  x + weight + bias read, y written, fp32 mean and rstd written;
  backward: dy + x + weight + mean + rstd read, dx + dweight + dbias written.
GB/s = bytes / median time; ``frac_peak`` divides by the copy bandwidth measured at the start.
Target on an H100: forward >= 90% and backward >= 80% of copy bandwidth for widths >= 4096
(ANCHORS.md: Liger ~2.9 TB/s fwd at 16384, torch eager ~1.75 TB/s). On the CPU, fasttfm runs
its CPU path (torch's fused CPU kernels): the rows say CPU and compare with torch there.
"""
import argparse
import importlib.util
import os
import sys

import torch
import torch.nn.functional as TF

if not __package__:  # run as a script (python bench/bench_layer_norm.py): the checkout's root on the path (PEP 366)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import fasttfm  # noqa: E402
from .common import Rotating, add_common_args, bandwidth_row, copy_bandwidth, device_info, write_results  # noqa: E402

WIDTHS = [256, 1024, 4096, 16384, 65536]


def providers(device, rms):
    fns, skipped = {}, []
    if rms:
        fns["fasttfm"] = lambda x, w, b: fasttfm.rms_norm(x, [x.shape[-1]], w, 1e-6)
        fns["torch"] = lambda x, w, b: TF.rms_norm(x, [x.shape[-1]], w, 1e-6)
    else:
        fns["fasttfm"] = lambda x, w, b: fasttfm.layer_norm(x, [x.shape[-1]], w, b, 1e-5)
        fns["torch"] = lambda x, w, b: TF.layer_norm(x, [x.shape[-1]], w, b, 1e-5)
    if device == "cuda":
        fns["torch.compile"] = torch.compile(fns["torch"])
    else:
        skipped.append("torch.compile: GPU only in this benchmark (CPU inductor codegen is not the comparison users make)")
    for name, module in (("apex", "apex.normalization"), ("liger", "liger_kernel")):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            skipped.append(f"{name}: not installed")
        elif device != "cuda":
            skipped.append(f"{name}: GPU only")
        else:
            skipped.append(f"{name}: installed but not wired in this version of the benchmark")
    return fns, skipped


def bytes_moved(rows, cols, es, rms, direction):
    params = cols * es * (1 if rms else 2)
    stats = rows * 4 * (1 if rms else 2)
    act = rows * cols * es
    fwd = 2 * act + params + stats
    bwd = 3 * act + params + stats + params
    return {"fwd": fwd, "bwd": bwd}[direction]


def run(args):
    device = args.device
    dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    widths = [1024, 4096] if args.quick else WIDTHS
    elems = (2**20 if device == "cpu" else 2**26) // (4 if args.quick else 1)
    peak = copy_bandwidth(device, mb=64 if device == "cpu" else 512)
    info = device_info(device)
    print(f"{info['device']}: measured copy bandwidth {peak:.1f} GB/s" + (" (CPU)" if device == "cpu" else ""))
    rows_out, skipped_all = [], set()
    for rms in (False, True):
        op = "rms_norm" if rms else "layer_norm"
        fns, skipped = providers(device, rms)
        skipped_all.update(f"{op}: {s}" for s in skipped)
        for dtype in dtypes:
            es = torch.tensor([], dtype=dtype).element_size()
            for cols in widths:
                rows = max(1, elems // cols)

                def make():
                    x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)
                    w = torch.randn(cols, device=device, dtype=dtype, requires_grad=True)
                    b = torch.randn(cols, device=device, dtype=dtype, requires_grad=True)
                    return x, w, b, torch.randn(rows, cols, device=device, dtype=dtype)

                inputs = Rotating(make, 1 if device == "cpu" else 3)
                for name, fn in fns.items():
                    def fwd():
                        x, w, b, _ = inputs.next()
                        with torch.no_grad():
                            return fn(x, w, b)

                    outs = [(s, fn(s[0], s[1], s[2])) for s in inputs.sets]
                    k = [0]

                    def bwd():
                        (x, w, b, dy), y = outs[k[0] % len(outs)]
                        k[0] += 1
                        return torch.autograd.grad(y, (x, w) if rms else (x, w, b), dy, retain_graph=True)

                    for direction, f in (("fwd", fwd), ("bwd", bwd)):
                        rows_out.append(bandwidth_row(op, name, f"rows={rows} cols={cols}", dtype, direction, device,
                                                      f, bytes_moved(rows, cols, es, rms, direction), peak))
    write_results(rows_out, info, args.out, f"layer_norm_{device}", sorted(skipped_all))
    for s in sorted(skipped_all):
        print("skipped:", s)
    return rows_out


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

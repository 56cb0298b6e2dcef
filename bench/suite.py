"""Run several benchmarks as one suite: ``python -m fasttfm bench all|<op>[,<op>...] [options]``.

    python -m fasttfm bench all --quick                  # every bench/bench_<op>.py, small cases
    python -m fasttfm bench attention,train --seqlens 256,512
    python -m fasttfm bench layer_norm --dtype bfloat16 --out /tmp/r
    python -m fasttfm bench --list

Ops are discovered from the file names ``bench/bench_<op>.py`` (a new bench module joins by
existing). Each module's ``main(argv)`` (or ``build_parser()`` + ``run(args)``) gets the common
options of ``bench/common.py``: ``--device --dtype --quick --out`` (+ ``--seqlens`` where the module
defines it); options after a single op name go to that module as they are.

The suite measures the device's peaks once at the start (copy GB/s and a large GEMM: bf16 on a GPU,
fp32 on the CPU), lists the installed and absent peers, prints which GPU cases are skipped and why
on a machine without a GPU, then writes under ``--out`` (default ``bench/results/`` in a source checkout,
``./fasttfm-bench-results`` for an installed fasttfm, whose harness is ``fasttfm.bench``):
  <op>_<device>.{csv,json,md}   per op (by the op's module)
  suite_<device>.{csv,json}     every row, normalized, with device, versions, commit, timestamp, peaks
  summary_<device>.md           the combined markdown summary (the command line that produced it first)
  <op>_<device>_throughput.png  TFLOP/s (attention, train) or GB/s (memory-bound ops) vs sequence
                                length (or row width), one panel per dtype and mask
  <op>_<device>_memory.png      peak memory vs sequence length (GPU runs; the CPU has no allocator stats)
Exit status: 0 when every op ran, 1 when one failed (the others still run and are written).
"""
import argparse
import csv
import dataclasses
import glob
import inspect
import json
import math
import os
import shlex
import sys
import time
import traceback

import torch

if not __package__:  # run as a script (python bench/suite.py): the checkout's root on the path (PEP 366)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from .common import default_out, device_info, measure_peaks, peers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))  # bench/ of a checkout, or fasttfm/bench/ when installed
ORDER = ["attention", "ring_attention", "layer_norm", "softmax", "cross_entropy", "train"]

GPU_ONLY_CASES = [
    "Triton/CUDA kernels (fasttfm's CPU tensors run its CPU reference paths; the rows say CPU)",
    "triton.testing.do_bench timing with 20/80% quantiles (CPU rows: torch.utils.benchmark median and quartiles)",
    "bf16 GEMM peak (the CPU peak is an fp32 1024^3 GEMM)",
    "peak memory per case (torch.cuda allocator statistics; the column is nan on the CPU)",
    "peer providers flash-attn, FlexAttention (compiled), xformers, Liger-Kernel, apex, quack",
    "torch.compile provider of the op benchmarks (GPU only there)",
]


def discover():
    """Op names from bench/bench_<op>.py, in the README's order, then any others alphabetically."""
    ops = sorted(os.path.basename(p)[len("bench_"):-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    return sorted(ops, key=lambda o: (ORDER.index(o) if o in ORDER else len(ORDER), o))


def _dtypes(spec):
    return [d.strip() for d in spec.replace(" ", ",").split(",") if d.strip()] if spec else []


def _seqlens(spec):
    return [int(s) for s in str(spec).replace(",", " ").split()] if spec else []


# -- adapters: a module whose main() takes no argv (its own argparse on sys.argv) gets its arguments here
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _attention_runs(args, out):
    """bench_attention.py's own CLI: one --dtype per run and --out as a CSV path."""
    runs = []
    for dt in _dtypes(args.dtype) or ["bf16"]:
        short = _SHORT.get(dt, dt)
        argv = ["--dtype", short, "--out", os.path.join(out, f"attention_{args.device}_{short}.csv")]
        seqlens = _seqlens(args.seqlens)
        if args.quick:
            seqlens = seqlens or ([128, 256] if args.device == "cpu" else [1024, 2048, 4096])
            argv += ["--d", "64", "--masks", "none", "causal", "--mode", "fwd", "fwd_bwd"]
        if seqlens:
            argv += ["--seqlens", *map(str, seqlens)]
        runs.append((argv, argv[3]))
    return runs


ADAPTERS = {"attention": _attention_runs}


def _accepts(module, flag):
    try:
        return f'"{flag}"' in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def _call(module, argv, peaks):
    """Run one bench module; its rows (list of Row) when it returns them."""
    if hasattr(module, "build_parser") and hasattr(module, "run"):
        a = module.build_parser().parse_args(argv)
        if hasattr(a, "peaks"):
            a.peaks = peaks
        return module.run(a)
    if inspect.signature(module.main).parameters:
        return module.main(argv)
    saved = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        return module.main()
    finally:
        sys.argv = saved


def run_op(op, args, extra, peaks):
    """[(normalized record, ...)] for one op."""
    import importlib

    module = importlib.import_module(f".bench_{op}", __package__)
    records = []
    if op in ADAPTERS and not _accepts(module, "--quick"):
        for argv, _ in ADAPTERS[op](args, args.out):
            argv = argv + extra
            print(f"$ bench_{op}.py {shlex.join(argv)}")
            _call(module, argv, peaks)
            path = argv[argv.index("--out") + 1]
            if os.path.exists(path):
                with open(path) as f:
                    records += [normalize_dict(op, r, peaks) for r in csv.DictReader(f)]
        return records
    argv = ["--device", args.device, "--out", args.out]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.quick:
        argv.append("--quick")
    if args.seqlens:
        if _accepts(module, "--seqlens"):
            argv += ["--seqlens", ",".join(map(str, _seqlens(args.seqlens)))]
        else:
            print(f"note: bench_{op} has no --seqlens option; its own cases run")
    argv += extra
    print(f"$ bench_{op}.py {shlex.join(argv)}")
    rows = _call(module, argv, peaks)
    if isinstance(rows, list):
        records = [normalize_row(r, peaks) for r in rows if dataclasses.is_dataclass(r)]
    else:  # a module that only writes files: read its JSON back
        path = os.path.join(args.out, f"{op}_{args.device}.json")
        if os.path.exists(path):
            with open(path) as f:
                records = [normalize_dict(op, r, peaks) for r in json.load(f).get("rows", [])]
    return records


# -- normalized records: one flat dict per measurement, whatever the module's row format
def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _case_fields(case):
    out = {}
    for part in str(case).split():
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


def _x_of(fields):
    for key in ("seqlen", "seq_len", "n", "cols", "vocab", "classes", "cache_len"):
        if key in fields:
            try:
                return key, int(fields[key])
            except ValueError:
                pass
    return "", float("nan")


def normalize_row(r, peaks):
    d = dataclasses.asdict(r)
    fields = _case_fields(r.case)
    x_name, x = _x_of(fields)
    group = " ".join(f"{k}={v}" for k, v in fields.items() if k in ("mask", "d", "causal"))
    frac = d["frac_peak"]
    if math.isnan(_num(frac)) and not math.isnan(_num(d["tflops"])):
        frac = d["tflops"] / peaks["gemm_tflops"]
    return dict(op=r.op, provider=r.provider, case=r.case, dtype=r.dtype, direction=r.direction, group=group,
                x_name=x_name, x=x, device=r.device, ms=r.ms, ms_lo=r.ms_lo, ms_hi=r.ms_hi, gbps=r.gbps,
                tflops=r.tflops, frac_peak=frac, peak_mem_mb=r.peak_mem_mb, note=r.note)


def normalize_dict(op, r, peaks):
    if "case" in r:  # a Row written as JSON/CSV by write_results
        fields = _case_fields(r["case"])
        x_name, x = _x_of(fields)
        rec = {k: r.get(k) for k in ("op", "provider", "case", "dtype", "direction", "device", "note")}
        rec.update({k: _num(r.get(k)) for k in ("ms", "ms_lo", "ms_hi", "gbps", "tflops", "frac_peak", "peak_mem_mb")})
        rec.update(group=" ".join(f"{k}={v}" for k, v in fields.items() if k in ("mask", "d")), x_name=x_name, x=x)
        return rec
    # bench_attention.py's own CSV columns (its tflops column is rounded to 0.01: recomputed here)
    tflops = _attention_tflops(r)
    case = " ".join(f"{k}={r[k]}" for k in ("batch", "heads", "seqlen", "cache_len", "d", "mask") if k in r)
    x_name = "seqlen" if "seqlen" in r else "cache_len"
    return dict(op=op, provider=r.get("provider"), case=case, dtype=r.get("dtype"), direction=r.get("mode"),
                group=f"d={r.get('d')} mask={r.get('mask', r.get('mode'))}", x_name=x_name, x=int(_num(r.get(x_name))),
                device="CPU" if str(r.get("device", "")).startswith("CPU") else r.get("device"), ms=_num(r.get("ms")),
                ms_lo=_num(r.get("ms_p20")), ms_hi=_num(r.get("ms_p80")), gbps=_num(r.get("cache_gbps")),
                tflops=tflops, frac_peak=tflops / peaks["gemm_tflops"], peak_mem_mb=_num(r.get("peak_mem_mb")),
                note=f"{r['tokens_per_s']} tok/s" if r.get("tokens_per_s") else "")


_MASKS = {"none": (False, (-1, -1), None), "causal": (True, (-1, -1), None),
          "window1k": (True, (1024, -1), None), "chunk1k": (True, (-1, -1), 1024)}


def _attention_tflops(r):
    """ANCHORS.md: 4 * B * H * D * visible (q, k) pairs, backward 2.5x forward (fwd_bwd: 3.5x)."""
    try:
        from .bench_attention import visible_pairs

        n, b, h, d = (int(r[k]) for k in ("seqlen", "batch", "heads", "d"))
        causal, window, chunk = _MASKS[r["mask"].split("+")[0]]
        flops = 4 * b * h * d * visible_pairs(n, n, causal, window, chunk) * (3.5 if r["mode"] == "fwd_bwd" else 1.0)
        return flops / (float(r["ms"]) * 1e-3) / 1e12
    except (KeyError, ValueError, ImportError):
        return _num(r.get("tflops"))


# -- plots
def plot(records, out, device):
    """One throughput figure per op (panels: dtype x group) and one memory figure where memory was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    written = []
    for op in sorted({r["op"] for r in records}):
        recs = [r for r in records if r["op"] == op and not math.isnan(_num(r["x"]))]
        if not recs:
            continue
        metric = "tflops" if any(not math.isnan(r["tflops"]) for r in recs) else "gbps"
        unit = "TFLOP/s" if metric == "tflops" else "GB/s"
        x_name = recs[0]["x_name"] or "size"
        for kind, key, ylabel in (("throughput", metric, unit), ("memory", "peak_mem_mb", "peak memory (MB)")):
            good = [r for r in recs if not math.isnan(_num(r[key]))]
            if not good:
                continue
            panels = sorted({(r["dtype"], r["group"]) for r in good})
            cols = min(3, len(panels))
            nrows = math.ceil(len(panels) / cols)
            fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
            colours, styles = {}, ["-", "--", ":", "-."]
            directions = {r["direction"] for r in good}
            for ax, (dt, group) in zip(axes.flat, panels):
                lines = {}
                for r in good:
                    if (r["dtype"], r["group"]) == (dt, group):
                        lines.setdefault((r["provider"], r["direction"]), []).append((r["x"], r[key]))
                for (prov, direction), pts in sorted(lines.items()):
                    pts.sort()  # one colour per provider, one line style per direction
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{prov} {direction}",
                            color=colours.setdefault(prov, f"C{len(colours)}"),
                            linestyle=styles[sorted(directions).index(direction) % len(styles)])
                ax.set_xscale("log", base=2)
                ax.set_xlabel(x_name)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{op} {dt} {group}".strip(), fontsize=9)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
            for ax in list(axes.flat)[len(panels):]:
                ax.axis("off")
            dev = good[0]["device"]
            fig.suptitle(f"{op} {kind} on {dev}" + (" (CPU: reference paths, not the GPU kernels)" if dev == "CPU" else ""),
                         fontsize=10)
            fig.tight_layout()
            path = os.path.join(out, f"{op}_{device}_{kind}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


# -- combined summary
def _f(v, spec):
    v = _num(v)
    return "-" if math.isnan(v) else format(v, spec)


def summary(records, info, peaks, peer_status, skipped, failures, pngs, command, out, device, elapsed):
    lines = [f"# fasttfm benchmarks on {info['device']}", "",
             f"Command: `{command}`", "",
             f"torch {info['torch']}, triton {info.get('triton')}, CUDA {info.get('cuda')}, commit {info.get('commit')}, "
             f"{info['timestamp']}, {elapsed:.0f} s", "",
             f"Measured peaks: copy {peaks['copy_gbps']:.1f} GB/s, GEMM ({peaks['gemm']}) {peaks['gemm_tflops']:.3f} TFLOP/s. "
             "`frac` = GB/s over the copy peak (memory-bound ops) or TFLOP/s over the GEMM peak (attention, train).", ""]
    if device == "cpu":
        lines += ["**CPU run**: every row is a CPU measurement of fasttfm's CPU paths, not of its GPU kernels; "
                  "compare it only with other CPU rows.", ""]
    lines += ["Peers: " + ", ".join(f"{n} ({'installed' if ok else 'not installed'})" for n, (ok, _) in peer_status.items()), ""]
    for op in sorted({r["op"] for r in records}, key=lambda o: (ORDER.index(o) if o in ORDER else 99, o)):
        recs = [r for r in records if r["op"] == op]
        lines += [f"## {op}", "", "| provider | case | dtype | dir | ms median [lo, hi] | TFLOP/s | GB/s | frac | peak MB | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in recs:
            lines.append(f"| {r['provider']} | {r['case']} | {r['dtype']} | {r['direction']} | {_f(r['ms'], '.4g')} "
                         f"[{_f(r['ms_lo'], '.4g')}, {_f(r['ms_hi'], '.4g')}] | {_f(r['tflops'], '.4g')} | "
                         f"{_f(r['gbps'], '.4g')} | {_f(r['frac_peak'], '.1%')} | {_f(r['peak_mem_mb'], '.4g')} | {r['note']} |")
        for p in pngs:
            if os.path.basename(p).startswith(f"{op}_"):
                lines += ["", f"![{os.path.basename(p)}]({os.path.basename(p)})"]
        lines.append("")
    if skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in skipped] + [""]
    if failures:
        lines += ["## Failed", ""] + [f"- {op}: {err}" for op, err in failures] + [""]
    text = "\n".join(lines)
    with open(os.path.join(out, f"summary_{device}.md"), "w") as f:
        f.write(text)
    return text


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fasttfm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ops", nargs="?", default="all", help="all, one op, or a comma-separated list (see --list)")
    p.add_argument("--list", action="store_true", help="list the discovered bench modules and exit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16,float16 (default: each op's own)")
    p.add_argument("--seqlens", default=None, help="e.g. 512,1024,2048 (ops with sequence lengths)")
    p.add_argument("--quick", action="store_true", help="a few small cases per op")
    p.add_argument("--out", default=default_out(), help="default: bench/results/ of a checkout, else "
                   "./fasttfm-bench-results")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser().parse_known_args(argv)
    available = discover()
    if args.list:
        print("\n".join(available))
        return 0
    ops = available if args.ops == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in available]
    if unknown:
        print(f"fasttfm bench: unknown op(s) {', '.join(unknown)}; available: all, {', '.join(available)}", file=sys.stderr)
        return 2
    if extra and len(ops) > 1:
        print(f"fasttfm bench: options {extra} go to a single op only", file=sys.stderr)
        return 2
    if os.environ.get("FASTTFM_REQUIRE_GPU") == "1" and not (args.device == "cuda" and torch.cuda.is_available()):
        print("fasttfm bench: FASTTFM_REQUIRE_GPU=1 but no CUDA device is in use (torch.cuda.is_available() is "
              f"{torch.cuda.is_available()}, --device {args.device})", file=sys.stderr)
        return 1
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    command = "python -m fasttfm bench " + shlex.join(argv)
    info = device_info(args.device)
    peaks = measure_peaks(args.device, quick=args.quick)
    label = " [CPU]" if args.device == "cpu" else ""
    print(f"{info['device']}: torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, commit {info['commit']}")
    print(f"measured peaks: copy {peaks['copy_gbps']:.1f} GB/s, GEMM {peaks['gemm']} {peaks['gemm_tflops']:.3f} TFLOP/s{label}")
    peer_status = peers()
    skipped = []
    for name, (ok, what) in peer_status.items():
        if not ok:
            skipped.append(f"peer {name} ({what}): not installed")
        elif args.device != "cuda":
            skipped.append(f"peer {name} ({what}): installed, GPU only")
    if args.device != "cuda":
        why = ("no CUDA device: torch.cuda.is_available() is False" if not torch.cuda.is_available()
               else "--device cpu")
        skipped += [f"GPU case: {c} ({why})" for c in GPU_ONLY_CASES]
    print("ops: " + ", ".join(ops))
    records, failures = [], []
    for op in ops:
        print(f"\n== {op} ==")
        try:
            records += run_op(op, args, extra, peaks)
        except Exception as exc:  # one failing op does not lose the others' results
            traceback.print_exc()
            failures.append((op, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        except SystemExit as exc:  # an op's argparse error
            failures.append((op, f"exited with {exc.code} (bad options for this op?)"))
        # the op's own skipped list, so the summary has it too
        path = os.path.join(args.out, f"{op}_{args.device}.json")
        if os.path.exists(path):
            with open(path) as f:
                skipped += [f"bench_{op}: {s}" for s in json.load(f).get("skipped", []) if f"bench_{op}: {s}" not in skipped]
    info.update({f"peak_{k}": v for k, v in peaks.items()})
    stem = f"suite_{args.device}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"command": command, "info": info, "skipped": skipped, "failures": failures, "rows": records}, f,
                  indent=1)
    if records:
        with open(os.path.join(args.out, stem + ".csv"), "w", newline="") as f:
            extra_cols = {"device_name": info["device"], **{k: v for k, v in info.items() if k != "device"}}
            w = csv.DictWriter(f, fieldnames=list(records[0]) + list(extra_cols))
            w.writeheader()
            w.writerows({**r, **extra_cols} for r in records)
    pngs = [] if args.no_plots else plot(records, args.out, args.device)
    summary(records, info, peaks, peer_status, skipped, failures, pngs, command, args.out, args.device,
            time.time() - t0)
    print(f"\n{len(records)} rows from {len(ops) - len(failures)}/{len(ops)} ops in {time.time() - t0:.0f} s")
    if args.device != "cuda":
        print("GPU cases skipped (and why):")
    for s in skipped:
        print("  skipped:", s)
    for op, err in failures:
        print(f"  FAILED: {op}: {err}")
    print(f"results: {os.path.join(args.out, f'summary_{args.device}.md')}" + "".join(f"\n         {p}" for p in pngs))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
